"""How the ROS entry points (node, listener, synthetic cameras) tell a signal's shutdown from a
failure when an exception comes out of spinning.

SIGINT/SIGTERM make rclpy shut the context down from its signal-handling thread while the
executor, a timer or the model worker may be inside rcl. What they raise then (an RCLError such as
"failed to initialize wait set: the given context is not valid", or a pybind11 "Unable to convert
call argument" error) is the shutdown, not an error, and ``rclpy.ok()`` does not always say so yet
at that moment: the shutdown completes a few milliseconds later.
"""
from __future__ import annotations

import time

_SHUTDOWN_TEXTS = ("context is not valid", "context is invalid", "context has been shutdown")


def ended_by_shutdown(exc: BaseException, grace_s: float = 1.0) -> bool:
    """True when ``exc`` is how a shut-down context surfaced (exit cleanly), False for a failure.
    An error that names no shutdown counts as one when the context goes down within ``grace_s``
    (a real failure is reported that much later)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    if isinstance(exc, (KeyboardInterrupt, ExternalShutdownException)) or not rclpy.ok():
        return True
    text = str(exc)
    if any(t in text for t in _SHUTDOWN_TEXTS):
        return True
    deadline = time.monotonic() + grace_s
    while rclpy.ok() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not rclpy.ok()
