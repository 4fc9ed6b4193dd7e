"""launch/multi_cam.launch.py under launch_pytest (needs a ROS 2 install with launch, launch_ros,
launch_pytest and this package built by colcon; skipped where they are not importable).

The launch file's arguments are parsed here without `launch`; the same nodes are exercised
without it in test_node.py (console entry points, parameter file).
"""
import ast
import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "multi_cam.launch.py"

try:
    import launch
    import launch_pytest
    import launch_ros  # noqa: F401
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
except ImportError:
    launch_pytest = None


def test_launch_file_parses_and_declares_its_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    declared = {
        node.args[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"
    }
    assert declared == {"params_file", "namespace", "model", "camera_topics", "caption", "synthetic",
                        "use_sim_time"}


def _load_with_stub_launch(monkeypatch):
    """Import the launch file against minimal stand-ins of launch / launch_ros that record
    what they are given (only where the real packages are absent)."""
    import importlib.util
    import types

    class Recorded:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    modules = {name: types.ModuleType(name) for name in
               ("launch", "launch.actions", "launch.substitutions", "launch_ros", "launch_ros.actions")}
    modules["launch"].LaunchDescription = lambda entities: list(entities)
    modules["launch.actions"].DeclareLaunchArgument = Recorded
    modules["launch.actions"].OpaqueFunction = Recorded
    modules["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    modules["launch_ros.actions"].Node = Recorded
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("multi_cam_launch", LAUNCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(launch_pytest is not None, reason="the real launch packages are installed")
def test_launch_arguments_become_node_parameters(monkeypatch):
    mod = _load_with_stub_launch(monkeypatch)
    entities = mod.generate_launch_description()
    defaults = {e.args[0]: e.kwargs["default_value"] for e in entities if "default_value" in e.kwargs}
    opaque = entities[-1].kwargs["function"]

    nodes = opaque(dict(defaults))  # all defaults: the node alone, with the installed parameter file
    assert len(nodes) == 1
    assert nodes[0].kwargs["executable"] == "qvl_node"
    params_file, overrides = nodes[0].kwargs["parameters"]
    assert params_file.endswith("multi_cam.yaml") and Path(params_file).exists()
    assert overrides == {"use_sim_time": False}

    context = dict(defaults, namespace="robot1", model="/models/x", synthetic="true", use_sim_time="true",
                   camera_topics="[front/image_raw, rear/image_raw/compressed]", caption="true",
                   params_file="/etc/my.yaml")
    node, cams = opaque(context)
    assert node.kwargs["namespace"] == cams.kwargs["namespace"] == "robot1"
    assert node.kwargs["parameters"] == ["/etc/my.yaml", {
        "use_sim_time": True, "model.path": "/models/x", "caption.enabled": True,
        "camera_topics": ["front/image_raw", "rear/image_raw/compressed"]}]
    assert cams.kwargs["executable"] == "synthetic_cameras"
    assert cams.kwargs["parameters"][1] == {"use_sim_time": True,
                                            "topics": ["front/image_raw", "rear/image_raw/compressed"]}
    assert mod._parse_list("a/image_raw, b/image_raw") == ["a/image_raw", "b/image_raw"]
    with pytest.raises(ValueError):
        opaque(dict(defaults, synthetic="maybe"))


if launch_pytest is None:
    @pytest.mark.skip(reason="launch_pytest is not installed (ROS 2 launch packages are not on PyPI)")
    def test_launch_starts_node_and_synthetic_cameras():
        pass

else:
    NAMESPACE = f"/launch_test_{os.getpid()}"

    @pytest.fixture(scope="module")
    def tiny_model(tmp_path_factory):
        from qvl_ros.model import save_tiny_checkpoint

        return str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl"))

    @launch_pytest.fixture
    def launch_description(tiny_model):
        return launch.LaunchDescription([
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                launch_arguments={
                    "namespace": NAMESPACE, "model": tiny_model, "synthetic": "true", "caption": "true",
                    "camera_topics": "[cam0/image_raw, cam1/image_raw, cam2/image_raw/compressed]",
                }.items()),
            launch_pytest.actions.ReadyToTest(),
        ])

    @pytest.mark.launch(fixture=launch_description)
    def test_launch_starts_node_and_synthetic_cameras():
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        from qvl_ros.ros.listener import FeatureListener

        context = rclpy.Context()
        rclpy.init(context=context)
        try:
            listener = FeatureListener(context=context, namespace=NAMESPACE, printer=None)
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(listener)
            thread = threading.Thread(target=executor.spin, daemon=True)
            thread.start()
            deadline = 60.0
            import time

            end = time.monotonic() + deadline
            while time.monotonic() < end and (listener.count < 5 or not listener.captions):
                time.sleep(0.1)
            assert listener.count >= 5, "no features from the launched node"
            assert listener.captions, "captions were enabled but none arrived"
            msg, _ = listener.received[-1]
            assert list(msg.camera_names) == ["cam0", "cam1", "cam2"]
            assert [t.name for t in msg.tensors][:3] == ["vision/cam0", "vision/cam1", "vision/cam2"]
            executor.shutdown(timeout_sec=2.0)
            listener.destroy_node()
        finally:
            rclpy.try_shutdown(context=context)
