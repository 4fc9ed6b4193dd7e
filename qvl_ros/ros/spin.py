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
* rclpy starts without its signal handlers; the node is constructed (a model load or warm-up
  runs to its end), then rclpy's handlers are installed: a signal then shuts the context down
  and wakes the executor (rclpy's handler chains to the recording one). A signal that came
  before ends the run at once, without spinning.
* Spinning ends when the context goes down; what rclpy raises because it went down is the
  shutdown (:func:`qvl_ros.ros.shutdown.ended_by_shutdown`), anything else is a failure (exit 1).
* The node is destroyed (the model worker joined: the batch in flight finishes) and rclpy is
  shut down, whatever signal comes in the meantime.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable, List, Optional, Sequence

__all__ = ["catch_signals", "signals_received", "run", "qvl_node", "qvl_listener", "synthetic_cameras"]

_received: List[int] = []
_installed = False


def _record(signum: int, _frame: Any) -> None:
    _received.append(signum)


def catch_signals() -> None:
    """Record SIGINT and SIGTERM instead of raising KeyboardInterrupt / dying (main thread only;
    a no-op elsewhere and when already done). For the rest of the process."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _record)
    signal.signal(signal.SIGTERM, _record)
    _installed = True


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
    from rclpy.signals import SignalHandlerOptions, install_signal_handlers

    from .shutdown import ended_by_shutdown

    catch_signals()
    rclpy.init(args=list(args), signal_handler_options=SignalHandlerOptions.NO)
    node = None
    code = 0
    try:
        node = make_node()
        install_signal_handlers(SignalHandlerOptions.ALL)
        if not _received:
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            try:
                code = spin(executor, node) if spin is not None else _spin_forever(executor)
            finally:
                _quietly(lambda: executor.shutdown(timeout_sec=1.0))
    except Exception as exc:
        if not ended_by_shutdown(exc, grace_s=0.0 if _received else 1.0) and not _received:
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
                    _report(None, name, exc)
                    code = 1
        _quietly(rclpy.try_shutdown)
    return code


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


# --- console entry points: signals first, then the heavy imports ------------------------------
def qvl_node() -> int:
    catch_signals()
    from .node import main

    return main()


def qvl_listener() -> int:
    catch_signals()
    from .listener import main

    return main()


def synthetic_cameras() -> int:
    catch_signals()
    from ..sim.synthetic import main

    return main()
