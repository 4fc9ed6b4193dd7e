"""ROS 2 glue: the node, the listener, and message <-> tensor helpers.

These modules import rclpy or the generated ``qvl_ros.msg`` types (``tensor_msg`` needs only numpy
for its array helpers). They stay thin: callbacks convert and enqueue through :mod:`qvl_ros.core`,
one worker thread runs :mod:`qvl_ros.model`.
"""
