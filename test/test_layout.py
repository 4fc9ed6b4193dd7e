"""The package layout's rules: `qvl_ros.model` and `qvl_ros.core` never need ROS.

Checked two ways: statically (no module in those packages imports rclpy, a ROS message package
or `qvl_ros.ros`), and by importing every one of their modules in a fresh interpreter in which
rclpy and the ROS message packages cannot be imported at all.
"""
import ast
import re
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
             "lifecycle_msgs", "qvl_ros.ros", "qvl_ros.msg", "qvl_ros.srv", "qvl_ros.action")


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


# ----------------------------------------------------------------------------- the import graph
def _module_name(path, root):
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root):
    """{module: {qvl_ros modules it imports}} over every module under ``root/qvl_ros``, with
    every import statement counted (function-level ones too), relative imports resolved; a
    ``from P import name`` where ``P.name`` is a module is an edge to that module."""
    files = {_module_name(p, root): p for p in sorted((root / "qvl_ros").rglob("*.py"))}
    graph = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    base = f"{up}.{node.module}" if node.module else up
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    edges.add(t)
        graph[mod] = edges
    return graph


def import_cycles(graph):
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycle_in_qvl_ros():
    assert import_cycles(import_graph(ROOT)) == []


def test_the_cycle_check_finds_an_added_cycle(tmp_path):
    """The check is not vacuous: a copy of the tree with one added import (core/rate_limit.py, which
    core/intake.py imports, importing core/intake.py back inside a function) has exactly that cycle."""
    import shutil

    shutil.copytree(ROOT / "qvl_ros", tmp_path / "qvl_ros", ignore=shutil.ignore_patterns("__pycache__"))
    probe = tmp_path / "qvl_ros" / "core" / "rate_limit.py"
    probe.write_text(probe.read_text() + "\n\ndef _probe():\n    from .intake import Intake\n    return Intake\n")
    added = ["qvl_ros.core.intake", "qvl_ros.core.rate_limit"]
    assert added not in import_cycles(import_graph(ROOT))
    assert import_cycles(import_graph(tmp_path)) == sorted(import_cycles(import_graph(ROOT)) + [added])


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in sorted((ROOT / "qvl_ros").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}: from {'.' * node.level}{node.module or ''} "
                                 f"import {', '.join(private)}")
    assert found == []


# ------------------------------------------------------------------- the table in architecture.md
def import_table():
    """{package: (may import, must not import)} from docs/architecture.md's table: the names in
    backticks of each cell; "the standard library" in a "may" cell allows it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            may = set(re.findall(r"`([^`]+)`", cells[1])) | ({"stdlib"} if "standard library" in cells[1] else set())
            may |= {"anything"} if cells[1].strip() == "anything" else set()
            rows[cells[0].strip("`")] = (may, set(re.findall(r"`([^`]+)`", cells[2])))
    return rows


def _package_imports(pkg):
    """Every name the modules of ``qvl_ros/pkg`` import: ours as ``sub.module`` (or ``sub``, a
    package), anything else by its top-level name, "stdlib" for the standard library. Imports of
    the package's own modules are left out."""
    names = set()
    for path in sorted((ROOT / "qvl_ros" / pkg).glob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "qvl_ros":
                if len(parts) == 1:
                    names.add("qvl_ros")
                elif parts[1] in ("msg", "srv", "action"):  # generated by colcon, in install/
                    names.add(parts[1])
                elif not ((ROOT / "qvl_ros" / parts[1]).is_dir() or (ROOT / "qvl_ros" / f"{parts[1]}.py").exists()):
                    names.add("qvl_ros")  # a name of the package itself (__version__)
                elif parts[1] != pkg:
                    module = ".".join(parts[1:3])
                    names.add(module if (ROOT / "qvl_ros" / (module.replace(".", "/") + ".py")).exists()
                              else parts[1])
            elif parts[0] in sys.stdlib_module_names:
                names.add("stdlib")
            else:
                names.add(parts[0])
    return names


def _allowed(name, cells):
    """Whether ``name`` is one of the cell's names: ``sub`` covers ``sub.module``."""
    return any(name == c or name.startswith(c + ".") for c in cells)


@pytest.mark.parametrize("pkg", ["model", "core", "ros", "offline", "sim"])
def test_each_package_imports_what_the_table_allows_and_nothing_it_forbids(pkg):
    rows = import_table()
    assert pkg in rows, f"docs/architecture.md has no row for {pkg}"
    may, must_not = rows[pkg]
    used = _package_imports(pkg)
    if "anything" not in may:
        assert sorted(n for n in used if not _allowed(n, may)) == [], f"{pkg} imports what its row does not allow"
    assert sorted(n for n in used if _allowed(n, must_not)) == [], f"{pkg} imports what its row forbids"


def test_the_table_check_sees_a_violation():
    assert not _allowed("rclpy", {"torch", "stdlib", "model"})
    assert _allowed("ros.node", {"ros"}) and not _allowed("ros.node", {"ros.feature_msgs"})
    assert _allowed("rclpy", {"rclpy"}) and not _allowed("rclpy_extra", {"rclpy"})


def test_no_module_of_qvl_ros_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "qvl_ros").rglob("*.py"))
            for n in [len(p.read_text().splitlines())] if n > 600}
    assert long == {}
