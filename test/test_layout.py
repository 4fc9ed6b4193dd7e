"""The package layout's rules: `qvl_ros.model` and `qvl_ros.core` never need ROS.

Checked two ways: statically (no module in those packages imports rclpy, a ROS message package
or `qvl_ros.ros`), and by importing every one of their modules in a fresh interpreter in which
rclpy and the ROS message packages cannot be imported at all.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROS_FREE = ("model", "core")
# Top-level names a ROS-free module must not import (rclpy and every ROS interface package it
# could reach for), plus our own ROS layer.
FORBIDDEN = ("rclpy", "rcl_interfaces", "std_msgs", "sensor_msgs", "diagnostic_msgs", "builtin_interfaces",
             "lifecycle_msgs", "qvl_ros.ros", "qvl_ros.msg", "qvl_ros.srv")


def _modules(pkg):
    return sorted((ROOT / "qvl_ros" / pkg).glob("*.py"))


def _imports(path):
    """Absolute names imported anywhere in a module (relative imports resolved)."""
    pkg = "qvl_ros." + path.parent.name
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
                names += [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                names.append(node.module)
    return names


def _forbidden(name):
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


@pytest.mark.parametrize("pkg", ROS_FREE)
def test_no_ros_import_in_source(pkg):
    found = {p.name: [n for n in _imports(p) if _forbidden(n)] for p in _modules(pkg)}
    assert _modules(pkg), f"no modules found in qvl_ros/{pkg}"
    assert {k: v for k, v in found.items() if v} == {}


def test_import_checker_sees_a_forbidden_import(tmp_path):
    """The static check above is not vacuous: it flags each way of importing ROS."""
    probe = tmp_path / "core" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import rclpy.node\nfrom ..ros.node import QvlNode\nfrom sensor_msgs.msg import Image\n")
    assert [n for n in _imports(probe) if _forbidden(n)] == [
        "rclpy.node", "qvl_ros.ros.node", "qvl_ros.ros.node.QvlNode", "sensor_msgs.msg"]


BLOCKER = """
import importlib, importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is made unimportable by this test")
sys.meta_path.insert(0, Block())
for b in BLOCKED:
    sys.modules.pop(b, None)
try:
    import rclpy
except ImportError:
    pass
else:
    raise SystemExit("rclpy still importable")
mods = {mods!r}
for m in mods:
    importlib.import_module(m)
leaked = sorted(n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in BLOCKED))
assert not leaked, leaked
print("imported", len(mods))
"""


def test_model_and_core_import_without_ros():
    mods = ["qvl_ros.model", "qvl_ros.core"] + [
        f"qvl_ros.{pkg}.{p.stem}" for pkg in ROS_FREE for p in _modules(pkg) if p.stem != "__init__"]
    code = BLOCKER.format(blocked=list(FORBIDDEN), mods=mods)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"imported {len(mods)}" in proc.stdout
