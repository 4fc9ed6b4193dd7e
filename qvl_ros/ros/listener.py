"""Print what ``qvl_node`` publishes: feature shapes, stamps, captions and latency.

    qvl-listener                                  # features + caption in the current namespace
    python -m qvl_ros.ros.listener --count 20         # exit after 20 feature messages
    ros2 run qvl_ros listener --ros-args -r __ns:=/robot1

One line per ``VisionFeatures`` message (set stamp, per-camera stamps relative to it, tensor
shapes and dtypes, latency = receive time on this node's clock minus the set stamp), one per
``Caption``. The tensors are rebuilt with :func:`qvl_ros.ros.tensor_msg.to_numpy`, exactly as a
consumer would. With ``--count``/``--duration`` it exits by itself and prints a summary.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

from rclpy.node import Node

from ..core.diagnostics import percentile
from ..core.stamps import format_stamp
from .feature_msgs import stamp_ns
from .tensor_msg import to_numpy

__all__ = ["FeatureListener", "describe_features", "main"]


def describe_features(msg: Any) -> str:
    """``vision/front (15, 64) float32, hidden (116, 64) float32``."""
    parts = []
    for t in msg.tensors:
        arr = to_numpy(t)
        parts.append(f"{t.name} {tuple(arr.shape)} {t.dtype}")
    return ", ".join(parts)


class FeatureListener(Node):
    """Subscribes to ``features`` and ``caption`` (relative names) and keeps what arrives.

    ``printer``: where lines go (default ``print``; None = silent). ``received`` holds
    ``(features_msg, latency_s)`` and ``captions`` the caption messages, for callers that
    inspect them (the demo, tests).
    """

    def __init__(self, *, node_name: str = "qvl_listener", printer: Optional[Callable[[str], Any]] = print,
                 features_topic: str = "features", caption_topic: str = "caption", **node_kwargs: Any) -> None:
        from qvl_ros.msg import Caption, VisionFeatures

        super().__init__(node_name, **node_kwargs)
        self._print = printer
        self._lock = threading.Lock()
        self.received: List[tuple] = []
        self.captions: List[Any] = []
        self.create_subscription(VisionFeatures, features_topic, self._on_features, 10)
        self.create_subscription(Caption, caption_topic, self._on_caption, 10)

    def _emit(self, line: str) -> None:
        if self._print is not None:
            self._print(line)

    def _on_features(self, msg: Any) -> None:
        now = self.get_clock().now().nanoseconds
        t = stamp_ns(msg.header.stamp)
        latency = (now - t) * 1e-9
        with self._lock:
            self.received.append((msg, latency))
            n = len(self.received)
        cams = " ".join(f"{name}{(stamp_ns(s) - t) * 1e-6:+.1f}ms"
                        for name, s in zip(msg.camera_names, msg.camera_stamps))
        self._emit(f"features #{n} stamp {format_stamp(t)} [{cams}] latency {latency * 1e3:.1f} ms: "
                   f"{describe_features(msg)}")

    def _on_caption(self, msg: Any) -> None:
        with self._lock:
            self.captions.append(msg)
        self._emit(f"caption  stamp {format_stamp(stamp_ns(msg.header.stamp))} {msg.prompt!r} -> {msg.text!r}")

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def summary(self) -> str:
        with self._lock:
            lat = sorted(x[1] for x in self.received)
            n, ncap = len(self.received), len(self.captions)
        if not n:
            return "no feature messages received"
        return (f"{n} feature messages, {ncap} captions; latency p50 {percentile(lat, 50) * 1e3:.1f} ms, "
                f"p95 {percentile(lat, 95) * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qvl_listener``; the start, spin and end: :func:`qvl_ros.ros.spin.run`."""
    import rclpy
    from rclpy.utilities import remove_ros_args

    from .spin import run

    argv = list(sys.argv if argv is None else argv)
    ap = argparse.ArgumentParser(prog="qvl-listener", description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=0, help="exit after this many feature messages")
    ap.add_argument("--duration", type=float, default=0.0, help="exit after this many seconds")
    ap.add_argument("--features-topic", default="features")
    ap.add_argument("--caption-topic", default="caption")
    args = ap.parse_args(remove_ros_args(argv)[1:])

    def listen(executor, node) -> int:
        end = time.monotonic() + args.duration if args.duration > 0 else None
        while rclpy.ok():
            if args.count and node.count >= args.count:
                break
            if end is not None and time.monotonic() >= end:
                break
            executor.spin_once(timeout_sec=0.1)
        return 1 if args.count and node.count < args.count and rclpy.ok() else 0

    return run(lambda: FeatureListener(features_topic=args.features_topic, caption_topic=args.caption_topic,
                                       printer=lambda line: print(line, flush=True)),
               args=argv, spin=listen, on_end=lambda node: print(node.summary(), flush=True),
               name="qvl_listener")


if __name__ == "__main__":
    from .spin import catch_signals, exit_now

    catch_signals()
    exit_now(main())
