"""Shared pytest set-up: keep DDS on this machine, in a domain of its own, and never reach a
model hub. scripts/run.sh sets the same variables; these defaults cover a bare `pytest`.

`make test` sets QVL_REQUIRE_ROS=1: there the ROS side (rclpy, the generated qvl_ros messages,
the interface packages, rosbags, OpenCV) must import, and the run stops with an error naming
what is missing instead of quietly skipping the DDS, bag and conversion tests. In CI
(`CI=true`) the ROS 2 packages no registry serves must import too (launch, launch_ros,
launch_pytest, message_filters, vision_msgs, composition_interfaces: scripts/setup.sh takes
them from ../shared/ros2-extra or a sourced ROS 2 install), so their tests cannot skip there.
"""
import importlib
import os
import random

import pytest

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REQUIRED_WITH_ROS = ("rclpy", "qvl_ros.msg", "sensor_msgs.msg", "diagnostic_msgs.msg", "rosbags", "cv2")
REQUIRED_IN_CI = ("launch", "launch_ros", "launch_pytest", "ros2cli", "message_filters", "vision_msgs.msg",
                  "composition_interfaces.srv")


def pytest_sessionstart(session):
    required = REQUIRED_WITH_ROS if os.environ.get("QVL_REQUIRE_ROS") == "1" else ()
    if os.environ.get("CI") == "true":
        required += REQUIRED_IN_CI
    missing = []
    for name in required:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken native library
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        pytest.exit("QVL_REQUIRE_ROS=1 or CI=true, but these do not import, so their tests would be skipped: "
                    + "; ".join(missing) + ". Run the tests through `make test` (scripts/setup.sh builds "
                    "the messages) or unset QVL_REQUIRE_ROS.", returncode=3)


class RosSpin(tuple):
    """``(context, executor)`` of a test module's own ROS context; ``thread`` spins the executor."""

    def __new__(cls, context, executor, thread):
        spin = super().__new__(cls, (context, executor))
        spin.thread = thread
        return spin


@pytest.fixture(scope="module")
def ros():
    """A ROS context of the test module's own, its SingleThreadedExecutor spinning on a thread as
    qvl_node's main spins it (qvl_ros.ros.spin): a :class:`RosSpin`."""
    import threading

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context, args=[])
    executor = SingleThreadedExecutor(context=context)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield RosSpin(context, executor, thread)
    executor.shutdown(timeout_sec=2.0)
    rclpy.try_shutdown(context=context)
    thread.join(5)


@pytest.fixture(scope="module")
def endless_path(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint whose answers never end before their token limit."""
    import json

    from qvl_ros.model import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("endless") / "qwen2_5_vl", family="qwen2_5_vl", seed=0)
    gen = path / "generation_config.json"
    cfg = json.loads(gen.read_text())
    cfg["eos_token_id"] = -1  # no token ends an answer: it runs to its limit
    gen.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """The tiny Qwen2.5-VL checkpoint (random weights, seed 0) in the test module's own directory."""
    from qvl_ros.model import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", family="qwen2_5_vl", seed=0)
