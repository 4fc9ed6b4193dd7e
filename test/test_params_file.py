"""config/multi_cam.yaml, the parameter file `ros2 launch` and the README give the nodes.

Oracles: PyYAML, with a loader that refuses a key given twice in one mapping (plain YAML keeps
the last one silently, so a duplicate hides whichever value came first), and rclpy itself:
the file's keys as rclpy reads a parameter file (``parameter_dict_from_yaml_file``) must all be
parameters the nodes declare, with values of the declared type.
"""
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "config" / "multi_cam.yaml"


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that raises on a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"key {key!r} given twice (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def test_the_loader_refuses_a_duplicate_key_at_any_depth():
    with pytest.raises(yaml.constructor.ConstructorError, match="'policy' given twice"):
        yaml.load("a:\n  sync:\n    policy: x\n    slop: 1\n    policy: y\n", Loader=UniqueKeyLoader)
    assert yaml.load("a:\n  sync:\n    policy: x\n  video:\n    policy: y\n", Loader=UniqueKeyLoader) == {
        "a": {"sync": {"policy": "x"}, "video": {"policy": "y"}}}


def test_the_parameter_file_has_no_duplicate_keys():
    data = yaml.load(PARAMS_FILE.read_text(), Loader=UniqueKeyLoader)
    assert set(data) == {"/**/qvl_node", "/**/synthetic_cameras"}


def _declared(node):
    return {name: param.type_ for name, param in node._parameters.items()}


def test_every_key_is_a_declared_parameter_of_its_node():
    rclpy = pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter, parameter_dict_from_yaml_file

    from qvl_ros.ros.node import QvlLifecycleNode
    from qvl_ros.sim.synthetic import SyntheticCameras

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        nodes = {"qvl_node": QvlLifecycleNode(context=context),  # declares, loads nothing until configured
                 "synthetic_cameras": SyntheticCameras(context=context)}
        try:
            for name, node in nodes.items():
                from_file = parameter_dict_from_yaml_file(str(PARAMS_FILE), target_nodes=[f"/**/{name}"])
                declared = _declared(node)
                unknown = sorted(set(from_file) - set(declared))
                assert not unknown, f"{name}: keys of {PARAMS_FILE.name} that the node does not declare: {unknown}"
                for key, msg in from_file.items():
                    value = Parameter.from_parameter_msg(msg)
                    assert value.type_ == declared[key], (name, key, value.type_, declared[key])
                assert len(from_file) >= 5
        finally:
            for node in nodes.values():
                node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
