"""Packaging: colcon builds of this checkout into a temporary directory, used as a ROS user would.

Two install variants of one build directory: the checkout set-up of `make setup`
(QVL_INSTALL_PYTHON_SOURCES=OFF: messages and launchers installed, sources from the checkout)
and a full install (ON). For each, in a clean environment: `source install/setup.bash`, then the
entry points (pip's `qvl-ros`, the `ros2 run` launchers in lib/qvl_ros) and the package import.
Then `colcon test` from that clean build runs a selection of the pytest suite and reports it.

The first build takes a minute or two here (the message code generation and compilation).
"""
import ast
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VARIANTS = {"checkout": "OFF", "full": "ON"}
ROS_ONLY_ALIASES = {"synthetic_cameras", "listener"}  # short names `ros2 run` had before
INNER = "QVL_PACKAGING_INNER"  # set for the suite that `colcon test` runs from here

pytestmark = [
    pytest.mark.skipif(shutil.which("colcon", path=str(BIN)) is None, reason="colcon is not installed"),
    pytest.mark.skipif(os.environ.get(INNER) == "1", reason="already inside the packaging test's colcon test"),
]


def clean_env(**extra):
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": f"{BIN}:/usr/bin:/bin", "LANG": "C.UTF-8",
           "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "HF_HUB_OFFLINE": "1"}
    env.update(extra)
    return env


def colcon(base, *args, env):
    cmd = ["colcon", "--log-base", str(base / "log"), *args, "--paths", str(ROOT),
           "--build-base", str(base / "build"), "--event-handlers", "console_cohesion+", "status-", "summary-"]
    res = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    base = tmp_path_factory.mktemp("colcon")
    prefix = str(BIN.parent)
    env = clean_env(AMENT_PREFIX_PATH=prefix, CMAKE_PREFIX_PATH=prefix)
    for variant, flag in VARIANTS.items():  # the second variant reuses the build: install only
        colcon(base, "build", "--install-base", str(base / f"install_{variant}"),
               "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", f"-DQVL_INSTALL_PYTHON_SOURCES={flag}",
               env=env)
    return base


def sourced(install, script, **env):
    """Run a bash script after `source install/setup.bash`, from a neutral directory."""
    res = subprocess.run(["bash", "-c", f"source {install}/setup.bash && {script}"], cwd="/",
                         env=clean_env(**env), capture_output=True, text=True, timeout=300)
    return res


def console_scripts():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CONSOLE_SCRIPTS":
            pairs = [s.split("=") for s in ast.literal_eval(node.value)]
            return {name.strip(): target.strip() for name, target in pairs}
    raise AssertionError("setup.py defines no CONSOLE_SCRIPTS")


CHECK_LAUNCHERS = r"""
import runpy, sys
for path in sys.argv[1:]:
    ns = runpy.run_path(path, run_name="launcher")  # imports the target (as main), does not run it
    print(path.rsplit("/", 1)[1], ns["main"].__module__ + ":" + ns["main"].__name__)
import qvl_ros, qvl_ros.msg
print("package", qvl_ros.__version__, qvl_ros.msg.VisionFeatures.__name__, qvl_ros.__path__[0])
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_entry_points_after_sourcing_setup_bash(installs, variant):
    install = installs / f"install_{variant}"
    lib = install / "qvl_ros" / "lib" / "qvl_ros"
    launchers = sorted(p.name for p in lib.iterdir())
    scripts = console_scripts()
    assert set(launchers) == set(scripts) | ROS_ONLY_ALIASES

    res = sourced(install, "qvl-ros --help && " + f"{lib}/qvl_listener --help && {lib}/qvl-demo --help")
    assert res.returncode == 0, res.stderr
    assert "usage: qvl-ros" in res.stdout and "ImportError" not in res.stderr
    assert res.stdout.count("usage:") == 3

    res = sourced(install, f"python -c '{CHECK_LAUNCHERS}' " + " ".join(str(lib / n) for n in launchers))
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    for name in launchers:
        target = scripts[name] if name in scripts else scripts["qvl_" + name]
        assert lines[name] == target
    version, msg_type, package_dir = lines["package"].split(" ")
    assert version == ast.literal_eval(next(
        line.split("=", 1)[1] for line in (ROOT / "qvl_ros" / "__init__.py").read_text().splitlines()
        if line.startswith("__version__")))
    assert msg_type == "VisionFeatures"
    expected_dir = ROOT / "qvl_ros" if variant == "checkout" else install
    assert Path(package_dir).resolve().is_relative_to(expected_dir.resolve())
    assert (install / "qvl_ros" / "share" / "qvl_ros" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()


def test_actions_without_vision_msgs(installs):
    """This clean environment has no vision_msgs: the Ask action is built, Detect (whose result
    holds vision_msgs arrays) is left out, and the build succeeds."""
    res = sourced(installs / "install_full", "python -c 'import qvl_ros.action as a; "
                  "print(a.Ask.Goal.get_fields_and_field_types()[\"prompt\"], hasattr(a, \"Detect\"))'")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["string", "False"]


def test_colcon_test_runs_the_pytest_suite(installs):
    selection = "test_validation_and_default_slop or test_two_30hz_cameras_28ms_apart"
    env = clean_env(PYTEST_ADDOPTS=f"-k '{selection}'", **{INNER: "1"})
    colcon(installs, "test", "--install-base", str(installs / "install_full"), env=env)
    result = installs / "build" / "qvl_ros" / "test_results" / "qvl_ros" / "pytest.xunit.xml"
    suite = ET.parse(result).getroot().find("testsuite")
    ran = [case for case in suite.iter("testcase") if case.find("skipped") is None]
    names = sorted(case.get("name") for case in ran)
    assert names == ["test_two_30hz_cameras_28ms_apart", "test_validation_and_default_slop"]
    # modules that skip as a whole where their hardware is missing (test_cuda), or vision_msgs (not
    # in this clean environment: an optional dependency), may add skips
    skipped = [case for case in suite.iter("testcase") if case.find("skipped") is not None]
    assert all("cuda" in case.get("classname", "") + case.get("name", "")
               or "could not import 'vision_msgs" in (case.find("skipped").text or "") for case in skipped)
    assert suite.get("failures") == suite.get("errors") == "0"
    summary = subprocess.run(["colcon", "test-result", "--test-result-base", str(installs / "build")],
                             env=clean_env(), capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0 and "0 failures" in summary.stdout


def test_package_manifest_and_license():
    root = ET.parse(ROOT / "package.xml").getroot()
    license_el = root.find("license")
    assert license_el.text == "Apache-2.0" and license_el.get("file") == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    maintainer = root.find("maintainer")
    assert maintainer.text and not any(w in maintainer.get("email").lower() for w in ("todo", ".invalid"))
    assert root.find("url") is not None and root.find("url").text.startswith("https://")
    deps = {kind: {e.text for e in root.findall(kind)} for kind in
            ("depend", "exec_depend", "test_depend", "build_depend")}
    assert "python3-opencv" in deps["test_depend"]
    assert "python3-opencv" not in deps["exec_depend"] | deps["depend"]
    assert {"python3-torch", "python3-torchvision", "python3-transformers-pip", "python3-rosbags-pip",
            "ament_index_python"} <= deps["exec_depend"]
    assert "ament_cmake_pytest" in deps["test_depend"]
