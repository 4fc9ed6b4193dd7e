"""Start, spin and end one ROS process: the one way ``qvl_node``, the listener and the synthetic
cameras run, so that a Ctrl-C at any moment ends each of them with exit code 0.

A terminal's Ctrl-C sends SIGINT to every process of its group at once; ``ros2 launch`` then
sends its own SIGINT to each process it started, and SIGTERM a few seconds later. So a process
can get several signals, at any moment: while Python imports torch, while the model loads or
warms up, inside a batch or a caption, inside ``destroy_node``. Python's default SIGINT handler
raises KeyboardInterrupt wherever the main thread is, and one raised in the wrong line (a
``finally``, a join, interpreter exit) is a traceback and an exit by signal ("process has died").
The rules here:

* :func:`catch_signals` runs first, before the heavy imports (the console entry points below do
  it before importing their module): SIGINT and SIGTERM are recorded, never raised.
* rclpy's own handlers come next (``rclpy.init``): a signal shuts the context down and wakes
  the executor; they chain to the recording handler. A signal that came before ``rclpy.init``
  ends the run at once.
* Steps that hold nothing to release in order (loading a model, warming it up: main thread, no
  worker thread yet) run under :func:`interruptible`: there a signal raises
  :class:`Interrupted` and abandons the step at once, instead of after the many seconds it can
  take (``ros2 launch`` escalates to SIGTERM after 5 s and to SIGKILL after 15 s).
* Spinning ends when the context goes down; what rclpy raises because it went down is the
  shutdown (:func:`qvl_ros.ros.shutdown.ended_by_shutdown`), anything else is a failure (exit 1).
* The node is destroyed (the model worker joined: the batch in flight finishes) and rclpy is
  shut down, whatever signal comes in the meantime; then both signals are ignored, so that
  one arriving during the interpreter's finalization cannot end the process by signal.
* The console entry points then end the process with :func:`exit_now`: the atexit handlers
  run and the output is flushed, but the interpreter's teardown of torch, transformers and
  DDS, which frees nothing the system would not and took 9-12 s here after a Ctrl-C (more
  than the 5 s `ros2 launch` waits before escalating), is skipped.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, NoReturn, Optional, Sequence

__all__ = ["Interrupted", "catch_signals", "exit_now", "interruptible", "signals_received", "run"]

_received: List[int] = []
_installed = False
_interruptible_depth = 0
EXIT_WITH_PARENT = "QVL_EXIT_WITH_PARENT"  # "1": SIGTERM when the parent process dies (Linux)


class Interrupted(BaseException):
    """A signal arrived during an :func:`interruptible` step (a BaseException, like
    KeyboardInterrupt, so that ``except Exception`` on the way does not swallow it)."""


def _record(signum: int, _frame: Any) -> None:
    _received.append(signum)
    if _interruptible_depth:
        raise Interrupted(signal.Signals(signum).name)


@contextmanager
def interruptible() -> Iterator[None]:
    """Run the block so that SIGINT/SIGTERM abandon it (raise :class:`Interrupted`); for steps
    of the main thread that hold nothing needing an orderly release (a model load, a warm-up).
    Elsewhere (another thread, :func:`catch_signals` not called) the block just runs."""
    global _interruptible_depth
    if not _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    if _received:
        raise Interrupted(signal.Signals(_received[0]).name)
    _interruptible_depth += 1
    try:
        yield
    finally:
        _interruptible_depth -= 1


def catch_signals() -> None:
    """Record SIGINT and SIGTERM instead of raising KeyboardInterrupt / dying (main thread only;
    a no-op elsewhere and when already done). For the rest of the process."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    parent = os.getppid()
    signal.signal(signal.SIGINT, _record)
    signal.signal(signal.SIGTERM, _record)
    _installed = True
    if os.environ.get(EXIT_WITH_PARENT) == "1":
        _exit_with_parent(parent)


def _exit_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG). The launch
    file asks for it: `ros2 launch` has no SIGTERM handler of its own, so a SIGTERM kills it at
    once and its processes would run on without it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        _record(signal.SIGTERM, None)


def signals_received() -> List[int]:
    """The signals recorded so far (in order)."""
    return list(_received)


def run(make_node: Callable[[], Any], *, args: Sequence[str],
        spin: Optional[Callable[[Any, Any], int]] = None,
        on_end: Optional[Callable[[Any], None]] = None, name: str = "node") -> int:
    """Run one node until a signal (or ``spin`` returns) and return the exit code.

    Args:
        make_node: builds the node (after ``rclpy.init``; it may load a model).
        args: the process arguments, for ``rclpy.init`` (``--ros-args ...``).
        spin: ``spin(executor, node) -> exit code``; default ``executor.spin()``, then 0.
        on_end: called with the node before it is destroyed, also after a signal (a summary).
        name: how a failure is reported when there is no node to log it.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from .shutdown import ended_by_shutdown

    catch_signals()
    if _received:  # before rclpy was even up
        return 0
    rclpy.init(args=list(args))  # rclpy's signal handlers, chained to the recording one
    node = None
    code = 0
    try:
        if not _received:
            node = make_node()
        if not _received:
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            try:
                code = spin(executor, node) if spin is not None else _spin_forever(executor)
            finally:
                _quietly(lambda: executor.shutdown(timeout_sec=1.0))
    except Interrupted:
        pass
    except Exception as exc:
        if not _received and not ended_by_shutdown(exc):
            _report(node, name, exc)
            code = 1
    finally:
        if node is not None:
            if on_end is not None:
                _quietly(lambda: on_end(node))
            try:
                node.destroy_node()  # joins the model worker before the interpreter finalizes
            except Exception as exc:  # a context already shut down is not news at the end
                if not ended_by_shutdown(exc, grace_s=0.0):
                    print(f"{name}: destroying the node failed: {type(exc).__name__}: {exc}",
                          file=sys.stderr, flush=True)
                    code = 1
        _quietly(rclpy.try_shutdown)
        _ignore_signals()
    return code


def _ignore_signals() -> None:
    """From here on the process only exits: Python's finalization puts a handled signal back to
    its default (a late SIGINT, e.g. the one ``ros2 launch`` forwards, would kill the process
    with -2 on its way out), but it leaves an ignored one ignored."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _spin_forever(executor: Any) -> int:
    executor.spin()
    return 0


def _quietly(step: Callable[[], Any]) -> None:
    try:
        step()
    except Exception:
        pass


def _report(node: Any, name: str, exc: BaseException) -> None:
    msg = f"{name} failed: {type(exc).__name__}: {exc}"
    if node is not None:
        node.get_logger().fatal(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` after the atexit handlers and a flush of the output,
    without the interpreter's module teardown (see the module doc)."""
    import atexit
    import logging

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            _quietly(stream.flush)
        os._exit(code)
