"""qvl_ros.ros.shutdown: what an entry point treats as a signal's shutdown rather than a failure.

Oracle: rclpy itself. A second context is shut down under an executor, as a signal does under the
node's executor, while the process's default context is still up (the race in which
``rclpy.ok()`` alone says nothing); the RCLError rclpy raises then must count as a shutdown, and
other errors must not.
"""
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.context import Context  # noqa: E402
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor  # noqa: E402

from qvl_ros.ros.shutdown import ended_by_shutdown  # noqa: E402


def test_an_error_of_a_shut_down_context_is_a_shutdown_and_other_errors_are_failures():
    own_default = not rclpy.ok()
    if own_default:
        rclpy.init()
    other = Context()
    rclpy.init(context=other)
    node = rclpy.create_node("shutdown_probe", context=other)
    executor = SingleThreadedExecutor(context=other)
    executor.add_node(node)
    try:
        other.shutdown()
        with pytest.raises(Exception) as raised:
            executor.spin_once(timeout_sec=0.1)
        assert rclpy.ok()  # the default context is up: only the error's text tells
        assert ended_by_shutdown(raised.value), raised.value
        assert not ended_by_shutdown(RuntimeError("model worker failed: out of memory"), grace_s=0.05)
        assert not ended_by_shutdown(ValueError("bad parameter"), grace_s=0.0)
        assert ended_by_shutdown(ExternalShutdownException())
        assert ended_by_shutdown(KeyboardInterrupt())
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        other.try_shutdown()
        if own_default:
            rclpy.try_shutdown()
    if own_default:
        assert ended_by_shutdown(RuntimeError("anything")), "with no context up, everything is the shutdown"


def test_an_error_just_before_the_context_goes_down_is_the_shutdown():
    """The signal-handling thread shuts the context down a moment after the executor raised
    something unrelated-looking (a pybind11 conversion error, seen on SIGINT under load)."""
    if rclpy.ok():
        pytest.skip("the default context belongs to another test here")
    import sys
    import threading

    rclpy.init()
    caller, returned = threading.get_ident(), threading.Event()

    def close_once_the_check_runs():  # shut down only while ended_by_shutdown is already deciding
        while not returned.is_set():
            frame = sys._current_frames().get(caller)
            while frame is not None and frame.f_code.co_name != "ended_by_shutdown":
                frame = frame.f_back
            if frame is not None:
                rclpy.try_shutdown()
                return
            returned.wait(0.001)

    closer = threading.Thread(target=close_once_the_check_runs)
    try:
        closer.start()
        verdict = ended_by_shutdown(RuntimeError("Unable to convert call argument '0' to Python object"), grace_s=30)
        returned.set()
        assert verdict
    finally:
        returned.set()
        closer.join()
        rclpy.try_shutdown()


DESTROY_FAILS = r"""
import sys
import rclpy
from qvl_ros.ros import node as qn

original_init = qn.QvlNode.__init__

def init_then_fail_in_a_callback(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    def boom():
        raise RuntimeError("a callback failed")
    self.create_timer(0.05, boom)

def cleanup_fails(self):
    raise RuntimeError("destroy failed")

qn.QvlNode.__init__ = init_then_fail_in_a_callback
qn.QvlNodeMixin._cleanup = cleanup_fails
try:
    code = qn.main(["qvl_node", "--ros-args", "-p", "camera_topics:=[a/image_raw]", "-p", "model.warmup:=false"])
except BaseException as exc:
    code = f"raised {type(exc).__name__}: {exc}"
print("main:", code)
print("context up after main:", rclpy.ok())
"""


def test_a_failing_destroy_node_still_shuts_the_context_down():
    """qvl_node's main: a callback fails (exit status 1), then destroy_node() fails too (its
    pipeline clean-up raises). The context is still shut down, main returns 1 and says what failed."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", DESTROY_FAILS], capture_output=True, text=True, timeout=120)
    assert "main: 1\n" in proc.stdout, proc.stdout + proc.stderr
    assert "context up after main: False" in proc.stdout
    assert "destroying the node failed: RuntimeError: destroy failed" in proc.stderr
