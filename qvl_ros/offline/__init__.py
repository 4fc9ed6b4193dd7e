"""Offline work on recordings: rosbag2 input/output (via ``rosbags``), extraction, export, the CLI.

No rclpy: bags are read and written with the pure-Python ``rosbags`` library, frames go through the
same :mod:`qvl_ros.core` conversion and synchronizer as the node.
"""
