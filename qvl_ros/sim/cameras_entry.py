"""Console entry point of the synthetic cameras (`qvl_synthetic_cameras`, `ros2 run qvl_ros
synthetic_cameras`): SIGINT/SIGTERM are taken over first (qvl_ros.ros.spin), then the heavy
imports, as for qvl_node and the listener. It lives in `sim/` because `ros/` must not import `sim/`."""
from __future__ import annotations

from ..ros.spin import catch_signals, exit_now


def synthetic_cameras() -> int:
    catch_signals()
    from .synthetic import main

    exit_now(main())
