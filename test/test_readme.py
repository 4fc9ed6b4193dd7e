"""README.md's code runs as written.

Every ```python and ```bash block of README.md carries a marker after its language:

    ```python run                  runs in `make test`, as written
    ```bash skip: <reason>         shown, not run here (a GPU, a real checkpoint, a ROS 2 install, ...)

A block without a marker fails this test, so nothing new in the README goes unclassified. A
`run` block executes in a scratch directory of its own that holds links to the checkout's
`scripts/`, `config/`, `launch/`, `.venv/` and `install/` (and their `-kilted` twins) (so `scripts/run.sh ...` and
`config/multi_cam.yaml` mean what they mean in a checkout), with the test's environment: DDS
on loopback in a random domain, no model hub. Python blocks run with this interpreter; bash
blocks with `bash -e -o pipefail`, in a process group of their own that is killed afterwards,
so a background process a block starts cannot outlive it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGS = {"python", "bash", "sh"}
LINKED = ("scripts", "config", "launch", "bench", ".venv", "install", ".venv-kilted", "install-kilted", "qvl_ros")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str  # "run", "skip: <reason>" or "" (missing)
    code: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}"


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (``` fences, not nested)."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, lang, marker = i, m.group(1), m.group(2).strip()
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md line {start + 1}: the code block is never closed")
        out.append(Block(start + 1, lang, marker, "\n".join(body) + "\n"))
        i += 1
    return out


def _classified(b: Block) -> bool:
    return b.marker == "run" or re.match(r"^skip:\s*\S", b.marker) is not None


ALL = [b for b in blocks(README.read_text()) if b.lang in LANGS]
RUN = [b for b in ALL if b.marker == "run"]


def test_block_parser_sees_fences_and_markers():
    text = "x\n```python run\nprint(1)\n```\n```bash skip: needs a GPU\nnvidia-smi\n```\n```\nplain\n```\n"
    got = blocks(text)
    assert [(b.line, b.lang, b.marker, b.code) for b in got] == [
        (2, "python", "run", "print(1)\n"), (5, "bash", "skip: needs a GPU", "nvidia-smi\n"), (8, "", "", "plain\n")]
    assert [_classified(b) for b in got] == [True, True, False]
    with pytest.raises(ValueError, match="never closed"):
        blocks("```bash run\nls\n")


def test_every_code_block_is_marked():
    unmarked = [f"line {b.line} ({b.lang})" for b in ALL if not _classified(b)]
    assert not unmarked, ("README.md code blocks without a `run` or `skip: <reason>` marker after the "
                          "language: " + ", ".join(unmarked))
    assert RUN, "README.md has no runnable block"


def test_skipped_blocks_say_why():
    for b in ALL:
        if b.marker.startswith("skip"):
            assert len(b.marker.split(":", 1)[1].strip()) >= 8, f"line {b.line}: say why it is skipped"


def _scratch(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for name in LINKED:
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    return work


def _run(b: Block, work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if b.lang == "python":
        path = work / "block.py"
        cmd = [sys.executable, str(path)]
    else:
        path = work / "block.sh"
        cmd = ["bash", "-e", "-o", "pipefail", str(path)]
    path.write_text(b.code)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"README.md line {b.line}: still running after {TIMEOUT_S} s:\n{out[-4000:]}")
    finally:
        try:  # whatever the block left running in the background
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_block_runs(block: Block, tmp_path):
    res = _run(block, _scratch(tmp_path))
    assert res.returncode == 0, (f"README.md line {block.line} ({block.lang}) exited {res.returncode}:\n"
                                 f"{block.code}\n--- output ---\n{res.stdout[-6000:]}")


SKIP = [b for b in ALL if b.marker.startswith("skip")]


@pytest.mark.parametrize("block", SKIP, ids=[b.id for b in SKIP])
def test_readme_block_not_run_here(block: Block):
    pytest.skip(f"README.md line {block.line}: {block.marker.split(':', 1)[1].strip()}")
