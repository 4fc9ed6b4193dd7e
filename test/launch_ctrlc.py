"""Ctrl-C and supervisor signals against `ros2 launch qvl_ros multi_cam.launch.py`, as a user sends them.

A terminal's Ctrl-C sends SIGINT to every process of its foreground group: `ros2 launch`, the
nodes it started, and here a `qvl_listener` started in the same group. One run starts them in
a new process group, waits for a moment named by a log line (``MOMENTS``), sends SIGINT to the group
(optionally again, as an impatient user does) and checks the end: every process exits 0
within the time limit, launch logs "process has finished cleanly" for each process it started,
and nothing prints a traceback or "process has died". ``target="launch"`` sends the signal
(SIGINT or SIGTERM) to the `ros2 launch` process alone, as `timeout -s INT` or a supervisor
does; then every process, launch included, must be gone within the limit.

    scripts/run.sh python test/launch_ctrlc.py --runs 20          # scripts/ctrlc_check.sh
    scripts/run.sh python test/launch_ctrlc.py --target launch --signal TERM --runs 2

test_launch.py runs a few of these with a small model input; this file is also a script.

Known limits, both upstream: a SIGINT in the first tenths of a second of a process, while the
interpreter itself starts (before any code of this project runs), is Python's own
KeyboardInterrupt ("start" moment, not in the default set). With stdin not a tty (`ros2
launch` then runs non-interactively) launch sends its own SIGINT right after the group's; when
a process has exited in between, `subprocess.Popen.send_signal` (it polls first, bpo-38630)
can reap it before asyncio's ThreadedChildWatcher does, which then reports "Unknown child
process pid ..., will report returncode 255" and launch "process has died".
"""
from __future__ import annotations

import argparse
import os
import pty
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

# moment -> (stream, pattern of the line after which the signal goes out)
MOMENTS = {
    "start": ("launch", r"\[qvl_node-\d+\]: process started"),      # Python starts, imports torch
    "load": ("launch", r"\[qvl_node\]: loading "),                   # the model loads
    "warm-up": ("launch", r"\[qvl_node\]: loaded "),                 # the warm-up runs next
    "batch": ("listener", r"^features #"),                           # sets flow: a batch runs
    "caption": ("listener", r"^caption "),                           # a caption was generated
}
BAD = ("Traceback", "KeyboardInterrupt", "process has died", "Segmentation fault", "core dumped",
       "Fatal Python error")


@dataclass
class Stream:
    """Lines of one process's output, read on a thread, with the time each arrived."""
    proc: subprocess.Popen
    lines: List[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    ended: bool = False

    def start(self) -> "Stream":
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                if any(regex.search(line) for line in self.lines):
                    return True
                left = end - time.monotonic()
                if left <= 0 or self.ended:
                    return False
                self.cond.wait(min(left, 0.5))

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)


def _default_sigint() -> None:
    # A shell that starts this in the background leaves SIGINT ignored, and an ignored signal
    # stays ignored across exec: the processes under test get the terminal's default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Result:
    moment: str
    signals: str
    ok: bool
    exit_s: float
    problems: List[str]
    launch_log: str
    listener_log: str

    def line(self) -> str:
        verdict = "ok  " if self.ok else "FAIL"
        return f"{verdict} {self.moment:8s} {self.signals:22s} ended in {self.exit_s:5.1f} s" + (
            "" if self.ok else ": " + "; ".join(self.problems))


def run_once(moment: str, *, launch_args: Sequence[str] = ("synthetic:=true", "caption:=true"),
             target: str = "group", signame: str = "INT", repeat: bool = False,
             extra_delay_s: float = 0.0, moment_timeout_s: float = 300.0, exit_limit_s: float = 30.0,
             interactive: bool = True, env: Optional[dict] = None) -> Result:
    """One launch (and a listener in its group), one signal (or two) at ``moment``; the verdict."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    # A terminal: stdin is a tty, so `ros2 launch` is interactive and, on SIGINT, leaves the
    # signalling of its processes to the terminal (they are in its group) instead of sending its
    # own SIGINT after the group's (it does that when stdin is not a tty, see the module doc).
    tty_master, tty_slave = pty.openpty() if interactive else (None, None)
    launch = subprocess.Popen(["ros2", "launch", "qvl_ros", "multi_cam.launch.py", *launch_args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=tty_slave if interactive else subprocess.DEVNULL,
                              process_group=0, preexec_fn=_default_sigint, env=env, cwd=ROOT)
    if interactive:
        os.close(tty_slave)
    group = launch.pid
    listener = subprocess.Popen([sys.executable, "-m", "qvl_ros.listener"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=group,
                                preexec_fn=_default_sigint, env=env, cwd=ROOT)
    streams = {"launch": Stream(launch).start(), "listener": Stream(listener).start()}
    problems: List[str] = []
    sig = getattr(signal, "SIG" + signame)
    stream, pattern = MOMENTS[moment]
    if not streams[stream].wait_for(pattern, moment_timeout_s):
        problems.append(f"no {moment!r} line within {moment_timeout_s:.0f} s")
    time.sleep(extra_delay_s)
    send = (lambda s: os.killpg(group, s)) if target == "group" else launch.send_signal
    sent = [signame]
    t0 = time.monotonic()
    send(sig)
    if repeat:
        time.sleep(random.uniform(0.2, 1.5))
        _quiet(lambda: send(sig))
        sent.append(signame)
    exit_s = _wait_all([launch, listener] if target == "group" else [launch], t0, exit_limit_s)
    if target != "group":  # the listener was not signalled: it ends now, its own check is elsewhere
        _quiet(lambda: listener.send_signal(signal.SIGINT))
        _wait_all([listener], time.monotonic(), exit_limit_s)
    # The processes launch started are not our children: with launch gone (SIGTERM kills it at
    # once) nothing can be waited for, so the group is polled until it is empty or the limit
    # passes; "ended in" is then the time until the last of them was gone.
    left, gone_s = _wait_group(group, t0, exit_limit_s)
    exit_s = max(exit_s, gone_s)
    if left:
        problems.append(f"still running after {exit_limit_s:.0f} s: {left} ({_states(left)})")
        stacks = _native_stacks(left)
        _quiet(lambda: os.killpg(group, signal.SIGABRT))  # PYTHONFAULTHANDLER: each thread's stack in the log
        time.sleep(3.0)
        _quiet(lambda: os.killpg(group, signal.SIGKILL))
    for p in (launch, listener):
        _quiet(lambda: p.wait(timeout=10))
    if interactive:
        os.close(tty_master)
    time.sleep(0.2)  # the reader threads take the last lines
    log, heard = streams["launch"].text(), streams["listener"].text()
    if left:
        log += "\n--- native stacks of the processes left\n" + stacks
    if target == "launch" and signame == "TERM":  # launch dies at once (no handler): only "all gone" counts
        problems += [p for p in _check(log, heard, 0, listener.returncode)
                     if "finish cleanly" not in p and "process has died" not in p]
    else:
        problems += _check(log, heard, launch.returncode, listener.returncode)
    return Result(moment, f"{target} {'+'.join(sent)}", not problems, exit_s, problems, log, heard)


def _check(log: str, heard: str, launch_rc: Optional[int], listener_rc: Optional[int]) -> List[str]:
    problems = []
    if launch_rc != 0:
        problems.append(f"ros2 launch exit code {launch_rc}")
    if listener_rc != 0:
        problems.append(f"listener exit code {listener_rc}")
    started = re.findall(r"\[([\w-]+-\d+)\]: process started", log)
    if not started:
        problems.append("launch started no process")
    for name in started:
        if f"[{name}]: process has finished cleanly" not in log:
            problems.append(f"{name} did not finish cleanly")
    for text, who in ((log, "launch"), (heard, "listener")):
        for bad in BAD:
            if bad in text:
                problems.append(f"{who} output has {bad!r}")
    return problems


def _wait_all(procs, t0: float, limit_s: float) -> float:
    for p in procs:
        try:
            p.wait(timeout=max(0.0, t0 + limit_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return time.monotonic() - t0


def _wait_group(group: int, t0: float, limit_s: float, poll_s: float = 0.05) -> tuple:
    """(members still running when the group emptied or the limit passed, seconds since t0)."""
    while True:
        left = _group_members(group)
        elapsed = time.monotonic() - t0
        if not left or elapsed >= limit_s:
            return left, elapsed
        time.sleep(poll_s)


def _group_members(group: int) -> List[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == group and fields[0] != "Z":
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                out.append(f"{pid} {' '.join(a.decode() for a in argv0[:3])}")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _states(members: List[str]) -> str:
    """State, parent, caught and pending signals of each process, for the report of a hang."""
    out = []
    for member in members:
        pid = member.split()[0]
        try:
            fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            continue
        out.append(f"{pid}: {fields['State'].strip()} ppid {fields['PPid'].strip()} caught {fields['SigCgt'].strip()} "
                   f"pending {fields['ShdPnd'].strip()} wchan {wchan}")
    return "; ".join(out)


def _native_stacks(members: List[str]) -> str:
    """gdb's backtrace of every thread of each process (where gdb is installed)."""
    import shutil

    if shutil.which("gdb") is None:
        return "(no gdb)"
    out = []
    for member in members:
        pid = member.split()[0]
        res = subprocess.run(["gdb", "-p", pid, "-batch", "-ex", "thread apply all bt 12"],
                             capture_output=True, text=True, timeout=120)
        out.append(f"== {member}\n{res.stdout[-20000:]}")
    return "\n".join(out)


def _quiet(step) -> None:
    try:
        step()
    except (OSError, subprocess.TimeoutExpired):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--target", choices=("group", "launch"), default="group")
    ap.add_argument("--signal", choices=("INT", "TERM"), default="INT")
    ap.add_argument("--moments", nargs="+", choices=list(MOMENTS), default=["load", "warm-up", "batch", "caption"])
    ap.add_argument("--noninteractive", action="store_true",
                    help="stdin not a tty: launch also sends its own SIGINT to its processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logs", type=Path, help="write each failing run's output here")
    ap.add_argument("launch_args", nargs="*", default=["synthetic:=true", "caption:=true"])
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    results = []
    for i in range(args.runs):
        moment = args.moments[i % len(args.moments)]
        result = run_once(moment, launch_args=args.launch_args, target=args.target, signame=args.signal,
                          repeat=bool(i % 2), extra_delay_s=rng.uniform(0.0, 0.5),
                          interactive=not args.noninteractive)
        results.append(result)
        print(f"run {i + 1:2d}/{args.runs}: {result.line()}", flush=True)
        if not result.ok and args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            (args.logs / f"run{i + 1:02d}.log").write_text(result.launch_log + "\n--- listener\n" + result.listener_log)
    ok = sum(r.ok for r in results)
    worst = max((r.exit_s for r in results), default=0.0)
    print(f"{ok} of {len(results)} runs ended cleanly ({args.target} SIG{args.signal}); "
          f"slowest end {worst:.1f} s", flush=True)
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
