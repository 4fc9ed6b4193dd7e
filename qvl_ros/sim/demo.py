"""The README demo: the library on its own, then synthetic cameras -> qvl_node -> a listener.

    python -m qvl_ros.sim.demo [--duration 4] [--rate 10] [--no-caption] [--model DIR] [--device auto]

1. Library: the model on generated frames (feature shapes, encode timing, captions), as
   ``qvl_ros.sim.model_demo`` prints it.
2. ROS 2: three synthetic cameras (rgb8 320x240, yuv422 448x336, JPEG 256x192 on a
   ``/compressed`` topic) at ``--rate`` Hz with +-5 ms stamp jitter, the ``qvl_node`` node
   (captions on) and a listener, all in this process on one executor, talking
   over DDS (localhost only when started through scripts/run.sh). Prints what arrives (shapes,
   stamps, latency, captions) and a summary with timings, then exits 0 if features arrived.

Uses the bundled tiny model (random weights: captions are noise, shapes and timings are real).
No ``ros2`` command line tool is needed.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Optional, Sequence

CAMERAS = [  # topic, encoding, size
    ("demo/front/image_raw", "rgb8", "320x240"),
    ("demo/left/image_raw", "yuv422", "448x336"),
    ("demo/rear/image_raw/compressed", "jpeg", "256x192"),
]


def run_ros(model, duration: float, rate: float, caption: bool, max_new_tokens: int, show: int) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from ..ros.listener import FeatureListener
    from ..ros.node import QvlNode
    from .synthetic import SyntheticCameras

    topics = [c[0] for c in CAMERAS]
    context = rclpy.Context()
    rclpy.init(context=context, args=[])
    nodes = []
    shown = {"features": 0, "caption": 0}

    def printer(line: str) -> None:  # the first `show` messages of each kind, then every 10th
        kind = "caption" if line.startswith("caption") else "features"
        shown[kind] += 1
        if shown[kind] <= show or shown[kind] % 10 == 0:
            print("  " + line, flush=True)

    executor = SingleThreadedExecutor(context=context)  # the model has its own thread (see qvl_ros.ros.node)
    try:
        node = QvlNode(model=model, context=context, parameter_overrides=[
            Parameter("camera_topics", value=topics),
            Parameter("caption.enabled", value=caption),
            Parameter("caption.max_new_tokens", value=max_new_tokens),
            Parameter("prompt", value="What is in front of the robot?"),
            Parameter("batch.max_size", value=4),
            Parameter("batch.max_wait_ms", value=10.0),
        ])
        listener = FeatureListener(context=context, printer=printer)
        cameras = SyntheticCameras(context=context, parameter_overrides=[
            Parameter("topics", value=topics),
            Parameter("encodings", value=[c[1] for c in CAMERAS]),
            Parameter("sizes", value=[c[2] for c in CAMERAS]),
            Parameter("rate", value=float(rate)),
            Parameter("jitter_ms", value=5.0),
        ])
        nodes = [node, listener, cameras]
        for n in nodes:
            executor.add_node(n)
        spinner = threading.Thread(target=executor.spin, name="demo_executor", daemon=True)
        print(f"[ros] {len(topics)} synthetic cameras at {rate:g} Hz -> {node.get_fully_qualified_name()} "
              f"(captions {'on' if caption else 'off'}) -> listener, for {duration:g} s")
        t0 = time.perf_counter()
        spinner.start()
        time.sleep(duration)
        cameras.stop()
        node.wait_idle(5.0)
        time.sleep(0.3)  # let the last messages reach the listener
        wall = time.perf_counter() - t0
        stats = node.pipeline_stats()
        mon, batch, sync = stats["monitor"], stats["batch"], stats["sync"]
        lat, bt = mon["latency_s"], mon["batch_s"]
        print("[ros] summary")
        frames = ", ".join(f"{c['name']}: {c['received']} frames" for c in mon["cameras"])
        print(f"  cameras      {frames}")
        print(f"  synchronized {sync['sets']} sets, published {mon['published']} "
              f"({mon['published'] / wall:.1f} sets/s over {wall:.1f} s)")
        print(f"  listener     {listener.summary()}")
        if lat["count"]:
            print(f"  node latency stamp->publish p50 {lat['p50'] * 1e3:.1f} ms, p95 {lat['p95'] * 1e3:.1f} ms")
        if bt["count"]:
            print(f"  model        {batch['batches']} batches, mean size {mon['batch_size_mean']:.2f}, "
                  f"p50 {bt['p50'] * 1e3:.1f} ms per batch on {model.device}")
        drops = {f"sync.{k}": v for k, v in sync["drops"].items() if v}
        drops.update({f"batch.{k}": v for k, v in batch["drops"].items() if v})
        print(f"  drops        {drops or 'none'}")
        ok = listener.count > 0
        print(f"[ros] {'OK' if ok else 'FAILED: no feature message arrived'}")
        return 0 if ok else 1
    finally:
        executor.shutdown(timeout_sec=2.0)
        for n in nodes:
            n.destroy_node()
        rclpy.try_shutdown(context=context)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="qvl-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of camera traffic")
    ap.add_argument("--rate", type=float, default=10.0, help="camera rate (Hz)")
    ap.add_argument("--no-caption", action="store_true", help="features only")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled tiny model)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:k]")
    ap.add_argument("--show", type=int, default=4, help="print the first N messages of each kind, then every 10th")
    args = ap.parse_args(argv)

    from . import model_demo
    from ..model import BatchedQwenVL
    from ..model.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(args.model or "")
    print("[library] batched model on generated frames")
    model_demo.run(str(path), batch=2, cameras=3, device=args.device, max_new_tokens=args.max_new_tokens)
    model = BatchedQwenVL.from_pretrained(path, device=args.device, dtype="auto")
    return run_ros(model, args.duration, args.rate, not args.no_caption, args.max_new_tokens, args.show)


if __name__ == "__main__":
    sys.exit(main())
