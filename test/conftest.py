"""Shared pytest set-up: keep DDS on this machine, in a domain of its own, and never reach a
model hub. scripts/run.sh sets the same variables; these defaults cover a bare `pytest`.

`make test` sets QVL_REQUIRE_ROS=1: there the ROS side (rclpy, the generated qvl_ros messages,
the interface packages, rosbags, OpenCV) must import, and the run stops with an error naming
what is missing instead of quietly skipping the DDS, bag and conversion tests.
"""
import importlib
import os
import random

import pytest

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REQUIRED_WITH_ROS = ("rclpy", "qvl_ros.msg", "sensor_msgs.msg", "diagnostic_msgs.msg", "rosbags", "cv2")


def pytest_sessionstart(session):
    if os.environ.get("QVL_REQUIRE_ROS") != "1":
        return
    missing = []
    for name in REQUIRED_WITH_ROS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken native library
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        pytest.exit("QVL_REQUIRE_ROS=1 but these do not import, so the ROS tests would be skipped: "
                    + "; ".join(missing) + ". Run the tests through `make test` (scripts/setup.sh builds "
                    "the messages) or unset QVL_REQUIRE_ROS.", returncode=3)
