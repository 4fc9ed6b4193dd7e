"""Soak: qvl_node under 3 cameras x 30 Hz for minutes, every lost frame counted.

    scripts/run.sh python bench/soak.py [--duration 180] [--qos best_effort|reliable]
                                        [--transport default|shm] [--tag NAME]

Setup: the cameras are `qvl_ros.sim.synthetic.SyntheticCameras` in a process of their own (3 cameras,
320x240 rgb8 = 230 KB frames, 30 Hz, +-2 ms stamp jitter, publishing with the chosen
reliability); the node is `QvlNode` in this process over real DDS (localhost), spun by a
SingleThreadedExecutor as `qvl_node` does, with its default parameters except the camera
topics and ``qos.reliability``; the model is the bundled tiny Qwen2.5-VL (random weights,
float32, CPU): the point is the pipeline, not the model.

Counted, per camera and in total, from the moment both sides are connected:
  sent        frames the camera published between the first and the last frame that reached
              the node (the camera process returns every stamp it published; frames sent
              before discovery matched the two sides are listed apart);
  received    frames that reached the node's callback (its monitor);
  lost        sent - received: lost in DDS or overwritten in the subscription queue;
  estimated   the node's own estimate of that loss, in /diagnostics (stamp gaps and the
              middleware's message-lost events; qvl_ros.core.input_loss);
  sync drops  frames the synchronizer discarded (unmatched, too old, queue full, time reset);
  batch drops sets the batcher discarded (queue full: the model was behind);
  invalid     frames the conversion rejected;
  published   sets published; features arrived: counted by a subscriber here.
Also resident memory every second (start, peak, end, growth over the second half) and the
stamp -> publish latency (p50 / p95 / max over the whole run).

Writes bench/results/soak-<tag>.json and .md (tag default: "cpu", or "cpu-<qos>-<transport>"
for non-default settings). Other work on the machine shares the CPU; the results say so.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.node_bench import use_shm_transport  # noqa: E402

CAMERAS, RATE, SIZE = 3, 30.0, "320x240"


def apply_transport(mode: str, directory: str) -> str:
    """The DDS transport for this process and the camera process it starts (before rclpy.init)."""
    if mode == "default":
        return f"{os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')} default transports"
    return use_shm_transport(directory)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _pct(values, q):
    from qvl_ros.core.diagnostics import percentile

    return percentile(sorted(values), q)


def camera_process(ns: str, topics, duration: float, qos: str, conn) -> None:
    """The cameras, in a process of their own: publish for ``duration`` s, then send back the
    stamps published per camera."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from qvl_ros.ros.feature_msgs import stamp_ns
    from qvl_ros.sim.synthetic import SyntheticCameras

    rclpy.init(args=[])
    stamps = [[] for _ in topics]
    node = SyntheticCameras(namespace=ns, on_publish=lambda i, msg: stamps[i].append(stamp_ns(msg.header.stamp)),
                            parameter_overrides=[
                                Parameter("topics", value=list(topics)), Parameter("encodings", value=["rgb8"]),
                                Parameter("sizes", value=[SIZE]), Parameter("rate", value=RATE),
                                Parameter("jitter_ms", value=2.0), Parameter("qos.reliability", value=qos)])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    end = time.monotonic() + duration
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)
    node.stop()
    conn.send(stamps)
    node.destroy_node()
    rclpy.try_shutdown()


def run(args) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from qvl_ros.model import BatchedQwenVL, default_tiny_checkpoint
    from qvl_ros.msg import VisionFeatures
    from qvl_ros.ros.feature_msgs import stamp_ns
    from qvl_ros.ros.node import QvlNode

    transport = apply_transport(args.transport, tempfile.mkdtemp(prefix="qvl_soak_"))
    ns = f"/soak_{os.getpid()}"
    rclpy.init(args=[])
    model = BatchedQwenVL.from_pretrained(default_tiny_checkpoint(), device="cpu", dtype="float32")
    topics = [f"camera_{i}/image_raw" for i in range(CAMERAS)]
    node = QvlNode(model=model, namespace=ns, parameter_overrides=[
        Parameter("camera_topics", value=topics), Parameter("qos.reliability", value=args.qos)])
    arrivals, lock = [], threading.Lock()

    def on_features(msg):
        now = node.get_clock().now().nanoseconds
        with lock:
            arrivals.append((now - stamp_ns(msg.header.stamp)) * 1e-9)

    node.create_subscription(VisionFeatures, "features", on_features, 100)
    # First and last stamp per camera that reached the callback (a wrapper on this instance): the
    # frames sent before discovery matched both sides are not the node's loss.
    seen = [[None, None] for _ in topics]
    on_frame = node._on_frame

    def counting_on_frame(index, msg):
        t = stamp_ns(msg.header.stamp)
        span = seen[index]
        span[0] = t if span[0] is None else min(span[0], t)
        span[1] = t if span[1] is None else max(span[1], t)
        on_frame(index, msg)

    node._on_frame = counting_on_frame  # the subscriptions look it up on every call
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()

    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    cams = ctx.Process(target=camera_process, args=(ns, topics, args.duration, args.qos, child_end), daemon=True)
    rss, t0 = [], time.monotonic()
    cams.start()
    while cams.is_alive() and not parent_end.poll():
        rss.append((time.monotonic() - t0, _rss_mb()))
        time.sleep(1.0)
    published = parent_end.recv()  # per camera, the stamps it published
    cams.join(30)
    drain_end = time.monotonic() + 20
    while time.monotonic() < drain_end:  # frames in flight, then an idle batcher
        st = node.pipeline_stats()
        if st["batch"]["depth"] == 0 and st["batch"]["running"] == 0:
            time.sleep(1.0)
            break
        time.sleep(0.2)
    rss.append((time.monotonic() - t0, _rss_mb()))
    stats = node.pipeline_stats()
    loss = node._loss.snapshot()
    diag_loss = node._loss.status(node.get_fully_qualified_name())
    with lock:
        lat = list(arrivals)
    executor.shutdown(timeout_sec=2.0)
    node.destroy_node()
    rclpy.try_shutdown()

    mon, sync, batch = stats["monitor"], stats["sync"], stats["batch"]
    per_cam = []
    for k, c in enumerate(mon["cameras"]):
        first, last = seen[k]
        expected = sum(1 for t in published[k] if first is not None and first <= t <= last)
        lost = expected - c["received"]
        per_cam.append({"camera": c["name"], "sent": expected, "sent_before_match": len(published[k]) - expected,
                        "received": c["received"], "lost": lost, "lost_pct": 100 * lost / expected if expected else 0,
                        "estimated_lost": loss[k]["lost"], "estimated_gap": loss[k]["gap_lost"],
                        "estimated_rmw": loss[k]["rmw_lost"], "invalid": c["invalid"],
                        "sync_drops": {r: v for r, v in sync["dropped"][k].items() if v}})
    half = [m for t, m in rss if t >= rss[-1][0] / 2]
    total_sent = sum(c["sent"] for c in per_cam)
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
                   f"work during the run), cpu",
        "duration_s": args.duration, "rate_hz": RATE, "cameras": CAMERAS, "frame": f"{SIZE} rgb8",
        "qos": args.qos, "transport": transport, "model": "bundled tiny Qwen2.5-VL (random weights, float32)",
        "sent_total": total_sent, "received_total": sum(c["received"] for c in per_cam),
        "lost_total": sum(c["lost"] for c in per_cam),
        "lost_pct": 100 * sum(c["lost"] for c in per_cam) / total_sent if total_sent else 0,
        "estimated_lost_total": sum(c["estimated_lost"] for c in per_cam),
        "cameras_detail": per_cam,
        "sync_sets": sync["sets"], "sync_resets": sync["resets"], "sync_drops": sync["drops"],
        "batch_drops": batch["drops"], "sets_published": mon["published"], "features_arrived": len(lat),
        "model_errors": mon["model_errors"], "batch_size_mean": mon["batch_size_mean"],
        "latency_ms": {"p50": _pct(lat, 50) * 1e3, "p95": _pct(lat, 95) * 1e3,
                       "max": max(lat) * 1e3 if lat else None},
        "rss_mb": {"start": rss[0][1], "peak": max(m for _, m in rss), "end": rss[-1][1],
                   "growth_second_half": (max(half) - min(half)) if half else 0.0},
        "diagnostics_input_loss": diag_loss[2],
    }


def to_markdown(r: dict) -> str:
    lines = [f"# Soak: {r['cameras']} cameras x {r['rate_hz']:g} Hz for {r['duration_s']:g} s", "",
             "`scripts/run.sh python bench/soak.py` (see its docstring for what is counted).", "",
             f"- machine: {r['machine']}", f"- frames: {r['frame']}, QoS {r['qos']}, {r['transport']}",
             f"- model: {r['model']}", "",
             "| camera | sent | received | lost | lost % | node's estimate (gaps / rmw) | invalid | sync drops |",
             "|---|---|---|---|---|---|---|---|"]
    for c in r["cameras_detail"]:
        drops = ", ".join(f"{k} {v}" for k, v in c["sync_drops"].items()) or "0"
        lines.append(f"| {c['camera']} | {c['sent']} (+{c['sent_before_match']} before matching) | {c['received']} | {c['lost']} | {c['lost_pct']:.1f} | "
                     f"{c['estimated_lost']} ({c['estimated_gap']} / {c['estimated_rmw']}) | {c['invalid']} | {drops} |")
    lat, rss = r["latency_ms"], r["rss_mb"]
    batch = ", ".join(f"{k} {v}" for k, v in r["batch_drops"].items() if v) or "0"
    lines += ["", f"- frames lost before the callback: {r['lost_total']} of {r['sent_total']} "
                  f"({r['lost_pct']:.1f}%); the node estimated {r['estimated_lost_total']}",
              f"- sets: {r['sync_sets']} synchronized, {r['sets_published']} published, {r['features_arrived']} "
              f"features messages arrived; batch drops: {batch}; synchronizer resets {r['sync_resets']}; "
              f"model errors {r['model_errors']}; mean batch {r['batch_size_mean']:.2f}",
              f"- latency stamp -> features arrival: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, "
              f"max {lat['max']:.0f} ms",
              f"- resident memory: {rss['start']:.0f} MiB at start, peak {rss['peak']:.0f}, end {rss['end']:.0f}; "
              f"range over the second half {rss['growth_second_half']:.1f} MiB",
              f"- /diagnostics input loss: {r['diagnostics_input_loss']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--qos", choices=["best_effort", "reliable"], default="best_effort")
    ap.add_argument("--transport", choices=["default", "shm"], default="default")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    tag = args.tag or ("cpu" if (args.qos, args.transport) == ("best_effort", "default")
                       else f"cpu-{args.qos}-{args.transport}")
    result = run(args)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"soak-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"soak-{tag}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
