"""Pipeline core: frame conversion, synchronization, batching, diagnostics logic, camera naming.

Pure Python + torch. Nothing here imports rclpy or :mod:`qvl_ros.ros` (checked by
test/test_layout.py), so every rule of the pipeline is testable without ROS: the node and the
offline extractor both drive these classes.
"""
