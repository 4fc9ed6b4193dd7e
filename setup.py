"""pip install of the qvl_ros library and its console scripts.

`qvl_ros.model` needs only torch/transformers/safetensors; the ROS modules import rclpy lazily.
"""
from setuptools import find_packages, setup

setup(
    name="qvl_ros",
    version="0.1.0",
    description="Batched Qwen2.5-VL / Qwen2-VL over synchronized multi-camera ROS 2 input",
    packages=find_packages(include=["qvl_ros", "qvl_ros.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "transformers>=5,<6", "safetensors", "numpy"],
    extras_require={"ros": ["opencv-python-headless", "rosbags"]},
    entry_points={
        "console_scripts": [
            "qvl-demo = qvl_ros.sim.demo:main",
            "qvl_node = qvl_ros.ros.node:main",
            "qvl-synthetic-cameras = qvl_ros.sim.synthetic:main",
            "qvl-listener = qvl_ros.ros.listener:main",
            "qvl-ros = qvl_ros.offline.cli:main",
        ]
    },
)
