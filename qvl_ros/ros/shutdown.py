"""How the ROS entry points (node, listener, synthetic cameras) tell a signal's shutdown from a
failure when an exception comes out of spinning.

SIGINT/SIGTERM make rclpy shut the context down from its signal handler while the executor, a
timer or the model worker may be inside rcl. What they raise then (an RCLError such as "failed to
initialize wait set: the given context is not valid") is the shutdown, not an error, and
``rclpy.ok()`` does not always say so yet at that moment.
"""
from __future__ import annotations

_SHUTDOWN_TEXTS = ("context is not valid", "context is invalid", "context has been shutdown")


def ended_by_shutdown(exc: BaseException) -> bool:
    """True when ``exc`` is how a shut-down context surfaced (exit cleanly), False for a failure."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    if isinstance(exc, (KeyboardInterrupt, ExternalShutdownException)) or not rclpy.ok():
        return True
    text = str(exc)
    return any(t in text for t in _SHUTDOWN_TEXTS)
