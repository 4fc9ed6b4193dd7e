"""ROS 2 node ``qvl_node``: synchronized multi-camera frames -> batched Qwen-VL -> features/captions.

    python -m qvl_ros.ros.node --ros-args --params-file config/multi_cam.yaml
    ros2 run qvl_ros qvl_node --ros-args -p camera_topics:="[front/image_raw, left/image_raw]"

Data flow (the logic lives in the components; this module wires them to ROS):

* one subscription per camera (``sensor_msgs/Image``, or ``CompressedImage`` for topics ending
  in ``/compressed`` or with ``compressed: true``), sensor-data QoS; each camera has its own
  mutually exclusive callback group, so its frames stay in order on any executor;
* the callback converts the message to a uint8 ``(3, H, W)`` tensor on the model device
  (:mod:`qvl_ros.core.conversion`) and adds it to the :class:`~qvl_ros.core.synchronizer.Synchronizer`
  under the node's lock; complete sets go to the :class:`~qvl_ros.core.batcher.Batcher`. Invalid
  frames are dropped, counted and logged (throttled per topic and reason);
* the batcher's worker thread runs ``encode`` (or ``encode_generate`` when captions are on) on
  up to ``batch.max_size`` sets and publishes one ``VisionFeatures`` (and one ``Caption``) per
  set on ``features`` / ``caption`` (relative to the node namespace), stamps copied from the
  cameras' frames. A failing batch is retried set by set; a set that still fails is logged
  with its stamps and dropped; the node keeps serving;
* a steady-clock timer publishes ``/diagnostics`` (see :mod:`qvl_ros.core.diagnostics`).

Executor: ``main`` spins the node on a ``SingleThreadedExecutor``; callbacks only convert and
enqueue, and the model has its own thread. Prefer that when embedding the node too: rclpy's
``MultiThreadedExecutor`` polls without blocking while a mutually exclusive callback is running
and a new message waits, and that loop holds the GIL so much that the model thread crawls
(measured here: batches of 12 ms took up to 10 s, camera callbacks stalled for seconds).

Clips (``video.frames`` K >= 2): each camera also keeps a ring of its recent frames
(:mod:`qvl_ros.core.clips`); a synchronized set carries, per camera, the clip of K frames (every
``video.stride``-th) ending at its matched frame, its frame rate taken from the frames' stamps,
and the features message lists the clip stamps. Restarts of a ring and sets before every camera
holds a full clip are counted in ``/diagnostics``.

Parameters are declared from the table of :mod:`qvl_ros.core.params` (:mod:`qvl_ros.ros.params`);
``config/multi_cam.yaml`` documents every one. Those that need a restart (topics, QoS, synchronizer, queue depth, model)
are read-only; ``prompt``, ``features``, ``frame_id``, ``caption.*``, ``batch.max_size``,
``batch.max_wait_ms`` and ``diagnostics.stale_after`` can be changed at run time.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Optional, Sequence

import rclpy
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node

from ..core.topics import camera_names as default_camera_names
from .pipeline import QvlNodeMixin
from .node_results import describe_device, release_device_memory  # noqa: F401  (public names of the node)

__all__ = ["QvlNode", "QvlLifecycleNode", "QvlNodeMixin", "main", "default_camera_names", "describe_device",
           "release_device_memory"]

NODE_NAME = "qvl_node"


def __getattr__(name: str) -> Any:
    if name == "QvlPipeline":  # the mixin's old name
        warnings.warn("qvl_ros.ros.node.QvlPipeline is now QvlNodeMixin", DeprecationWarning, stacklevel=2)
        return QvlNodeMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class QvlNode(QvlNodeMixin, Node):
    """The ``qvl_node`` node, configured and active from construction. ``model``: an already
    loaded ``BatchedQwenVL`` to use instead of loading ``model.path`` (tests and embedding
    applications); other keyword arguments go to ``rclpy.node.Node`` (``context``,
    ``namespace``, ``parameter_overrides``, ...)."""

    def __init__(self, *, model: Any = None, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self._read_config()
        self._configure(model)
        self._activate()
        self._log_ready()


class QvlLifecycleNode(QvlNodeMixin, LifecycleNode):
    """``qvl_node`` as a managed (lifecycle) node: construction only declares the parameters;
    ``configure`` loads and warms up the model, ``activate`` subscribes and publishes,
    ``deactivate`` stops and drops the queued sets, ``cleanup`` frees the model. Transitions
    come from the ``~/change_state`` service (``ros2 lifecycle set``, launch) or trigger_*()."""

    def __init__(self, *, model: Any = None, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self._given_model = model
        self._read_config()

    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure(self._given_model)
        except Exception as exc:
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            self._cleanup()
            return TransitionCallbackReturn.FAILURE
        self._log_ready()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._activate()
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        if self._active:
            self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        if self._active:
            self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qvl_node`` / ``python -m qvl_ros.ros.node``; returns the exit code.
    Start, spin and the end on a signal: :func:`qvl_ros.ros.spin.run`."""
    import faulthandler

    from ..model.kernels import tune_cpu_allocator
    from .spin import run

    faulthandler.enable()  # a crash in native code (rcl, DDS, torch) leaves every thread's Python stack in the log

    tune_cpu_allocator()  # before the model thread allocates (see its docstring)
    args = list(sys.argv if argv is None else argv)
    from rclpy.utilities import remove_ros_args

    parser = argparse.ArgumentParser(prog="qvl_node", description="Batched Qwen-VL features from synchronized cameras.")
    parser.add_argument("--managed", action="store_true",
                        help="start as a lifecycle node (unconfigured; configure/activate through ~/change_state)")
    options = parser.parse_args(remove_ros_args(args)[1:])
    return run(lambda: QvlLifecycleNode() if options.managed else QvlNode(), args=args, name=NODE_NAME)


if __name__ == "__main__":
    from .spin import catch_signals, exit_now

    catch_signals()  # late (torch is imported), but before the model loads
    exit_now(main())
