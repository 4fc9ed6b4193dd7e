"""Console entry points of qvl_node and the listener (`qvl_node`, `qvl_listener`, `ros2 run
qvl_ros ...`): SIGINT/SIGTERM are taken over first (:mod:`qvl_ros.ros.spin`), then the heavy
imports (torch, rclpy). A module of its own so that `spin`, which the node imports, imports no node."""
from __future__ import annotations

from .spin import catch_signals, exit_now


def qvl_node() -> int:
    catch_signals()
    from .node import main

    exit_now(main())


def qvl_listener() -> int:
    catch_signals()
    from .listener import main

    exit_now(main())
