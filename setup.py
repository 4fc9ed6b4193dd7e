"""pip install of the qvl_ros library and its console scripts.

`qvl_ros.model` needs torch, torchvision (image resizing), transformers' tokenizers and
safetensors; the ROS modules import rclpy lazily (ROS 2 itself does not come from here). The
console scripts have the names of the package's `ros2 run` executables (CMakeLists.txt); the
ROS processes start in qvl_ros.ros.spin (signals first, then the heavy imports).
"""
from setuptools import find_packages, setup

CONSOLE_SCRIPTS = [
    "qvl_node = qvl_ros.ros.entry:qvl_node",
    "qvl_synthetic_cameras = qvl_ros.sim.cameras_entry:synthetic_cameras",
    "qvl_listener = qvl_ros.ros.entry:qvl_listener",
    "qvl-ros = qvl_ros.offline.cli:main",
    "qvl-demo = qvl_ros.sim.demo:main",
    # Earlier names, kept as aliases.
    "qvl-synthetic-cameras = qvl_ros.sim.cameras_entry:synthetic_cameras",
    "qvl-listener = qvl_ros.ros.entry:qvl_listener",
]

setup(
    name="qvl_ros",
    version="0.1.0",
    description="Batched Qwen2.5-VL / Qwen2-VL over synchronized multi-camera ROS 2 input",
    license="Apache-2.0",
    packages=find_packages(include=["qvl_ros", "qvl_ros.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "transformers>=5,<6", "safetensors", "numpy"],
    extras_require={"ros": ["rosbags"], "grounding": ["llguidance>=1.9,<2"], "ray": ["ray>=2.40", "rosbags"], "test": ["pytest", "opencv-python-headless", "pillow"]},
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
