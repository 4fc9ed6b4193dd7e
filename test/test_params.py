"""The parameter table (qvl_ros.core.params) against the parameter file, the extraction command and
the node's declarations.

Oracles: config/multi_cam.yaml as yaml reads it (and as a reader that refuses duplicate keys reads
it), rclpy's own descriptors of a running node, and argparse's parse of the extraction command.
"""
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from qvl_ros.core.params import (BY_NAME, PARAMS, ParamError, check_value, defaults,  # noqa: E402
                                 documented_yaml, read_params_file, slop_ns)
from qvl_ros.offline import extract as ex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "multi_cam.yaml"


def _documented_keys(text: str) -> dict:
    """{dotted key: comment block above it} of the qvl_node section, from the file's text."""
    out, comments, stack, inside = {}, [], [], False
    for line in text.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0:
            inside = body.rstrip(":").endswith("qvl_node")
            comments, stack = [], []
            continue
        if not inside:
            continue
        if body.startswith("#"):
            comments.append(body.lstrip("# "))
            continue
        key, _, value = body.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if value.strip():
            name = ".".join([s[1] for s in stack if s[1] != "ros__parameters"] + [key])
            out[name] = " ".join(comments)
        else:
            stack.append((indent, key))
        comments = []
    return out


def test_the_parameter_file_holds_every_parameter_of_the_table_with_a_valid_value():
    values = read_params_file(str(CONFIG))  # every key known and checked against its row
    documented = _documented_keys(CONFIG.read_text())
    assert set(documented) <= set(BY_NAME), set(documented) - set(BY_NAME)
    # camera_names: derived; detect.classes: empty by default (a file cannot give an empty list's
    # type); both shown commented out
    missing = set(BY_NAME) - set(values) - {"camera_names", "detect.classes"}
    assert not missing, missing
    assert "camera_names:" in CONFIG.read_text() and "classes:" in CONFIG.read_text()
    for name, comment in documented.items():  # (RO) marks exactly the read-only parameters
        assert ("(RO)" in comment) == BY_NAME[name].read_only, (name, comment)
    assert {k: v for k, v in values.items() if v != defaults()[k]} == {}  # the file shows the defaults


def test_each_rule_refuses_what_it_should_and_names_the_parameter():
    check_value("sync.slop", -1.0)
    check_value("sync.slop", 0.02)
    check_value("video.frames", 0)
    check_value("diagnostics.expected_rates", (10.0, 30))
    cases = [("sync.slop", -0.1), ("sync.slop", float("nan")), ("video.frames", 1), ("batch.max_size", 0),
             ("batch.max_size", True), ("features", []), ("features", ["vision", "logits"]),
             ("sync.stamp_source", "gps"), ("diagnostics.period", 0.0), ("diagnostics.rate_tolerance", 1.5),
             ("diagnostics.expected_rates", [-1.0]), ("model.dtype", "float64"), ("no.such", 1)]
    for name, value in cases:
        with pytest.raises(ParamError, match=re.escape(name)):
            check_value(name, value)
    assert slop_ns(-1.0, [0.0]) == 33_333_333 and slop_ns(-1.0, [30.0, 0.0]) == 11_111_111
    assert slop_ns(0.02, [30.0]) == 20_000_000


def test_the_documented_file_the_table_writes_reads_back_as_the_defaults(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(documented_yaml())
    assert read_params_file(str(path)) == defaults()
    text = documented_yaml()
    assert all(f"    # {p.description}" in text for p in PARAMS)


def test_extraction_defaults_and_options_are_the_nodes(tmp_path):
    """Without a file the extraction command uses the node's defaults; --params-file takes the
    node's file (camera_topics included, resolved in the root namespace); an option given on the
    command line wins over the file."""
    parser = ex.build_parser()
    plain = ex.config_from_args(parser.parse_args(["in", "-o", "out", "-t", "/a/image_raw"]))
    for field_name, name in ex.PARAM_OF.items():
        want = BY_NAME[name].default
        got = getattr(plain, field_name)
        if field_name in ("min_pixels", "max_pixels"):
            want = None if want == 0 else want
        if field_name == "expected_rates":
            got = list(got)
        if field_name == "features":
            got = list(got)
        assert got == want, (field_name, got, want)
    assert ex.intake_settings(plain).slop_ns == 33_333_333  # auto: a third of 10 Hz, as the node
    params = tmp_path / "p.yaml"
    params.write_text("/**/qvl_node:\n  ros__parameters:\n    camera_topics: [front/image_raw, /rear/image_raw]\n"
                      "    sync: {slop: 0.05, queue_size: 20, policy: max_sets}\n    batch: {max_size: 2}\n"
                      "    caption: {enabled: true, max_new_tokens: 5}\n    model: {path: /some/ckpt}\n"
                      "    diagnostics: {expected_rates: [30.0]}\n    video: {frames: 3}\n")
    cfg = ex.config_from_args(parser.parse_args(["in", "-o", "out", "--params-file", str(params), "--batch", "3"]))
    assert list(cfg.topics) == ["/front/image_raw", "/rear/image_raw"]
    assert (cfg.slop, cfg.queue_size, cfg.policy, cfg.batch, cfg.caption, cfg.max_new_tokens, cfg.model,
            cfg.clip_frames) == (0.05, 20, "max_sets", 3, True, 5, "/some/ckpt", 3)
    params.write_text("/**/qvl_node:\n  ros__parameters:\n    sync: {slop: -0.5}\n")
    with pytest.raises(ex.ExtractError, match="sync.slop"):
        ex.config_from_args(parser.parse_args(["in", "-o", "out", "-t", "/a", "--params-file", str(params)]))


def test_the_node_declares_the_table(tmp_path):
    """rclpy's descriptors of a node built from the table: type, read-only, range and rule."""
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("qvl_ros.msg")
    from rcl_interfaces.msg import ParameterType
    from rclpy.node import Node

    from qvl_ros.ros.params import declare_parameters

    types = {"string": ParameterType.PARAMETER_STRING, "strings": ParameterType.PARAMETER_STRING_ARRAY,
             "integer": ParameterType.PARAMETER_INTEGER, "double": ParameterType.PARAMETER_DOUBLE,
             "doubles": ParameterType.PARAMETER_DOUBLE_ARRAY, "bool": ParameterType.PARAMETER_BOOL}
    context = rclpy.Context()
    rclpy.init(context=context, args=[])
    node = Node("params_probe", context=context)
    try:
        values = declare_parameters(node)
        assert values["camera_names"] == ["camera_0", "camera_1", "camera_2"]
        for p in PARAMS:
            d = node.describe_parameter(p.name)
            assert (d.type, d.read_only, d.description, d.additional_constraints) == \
                (types[p.type], p.read_only, p.description, p.constraints), p.name
            ranges = list(d.integer_range) + list(d.floating_point_range)
            assert [(r.from_value, r.to_value) for r in ranges] == ([p.bounds] if p.bounds else []), p.name
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
