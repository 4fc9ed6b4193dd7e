"""qvl_ros: batched Qwen2.5-VL / Qwen2-VL over synchronized multi-camera frames, on ROS 2.

`qvl_ros.model` is pure PyTorch. The ROS-facing modules import rclpy only when used.
The generated message module `qvl_ros.msg` lives in the colcon install tree; extending the
package path lets a source checkout import it alongside the sources.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"
