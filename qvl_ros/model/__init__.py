"""Pure-PyTorch batched Qwen2.5-VL / Qwen2-VL (no ROS imports).

    from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint
"""
from .tiny import default_tiny_checkpoint, save_tiny_checkpoint
from .config import PRESETS, QwenVLConfig
from .decode_control import DecodeControl
from .model import BatchedQwenVL, Features
from .processor import TensorProcessor, smart_resize

__all__ = ["BatchedQwenVL", "DecodeControl", "Features", "QwenVLConfig", "PRESETS", "TensorProcessor", "smart_resize",
           "save_tiny_checkpoint", "default_tiny_checkpoint"]
