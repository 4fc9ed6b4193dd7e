"""qvl_node at saturation and at 1 Hz against `BatchedQwenVL.encode` alone, measured from outside.

    scripts/run.sh python bench/node_bench.py [--quick | --smoke] [--json FILE]

Processes (same ROS_DOMAIN_ID, localhost discovery, Fast DDS over shared memory, see SHM_PROFILE):
  node     `python -m qvl_ros.node` as users start it (so glibc malloc is tuned as qvl_node ships it,
           qvl_ros.model.kernels.tune_cpu_allocator), on the "small" benchmark config
           (docs/architecture.md, random weights, float32, CPU), batch.max_size 4,
           batch.queue_depth 4, reliable camera QoS;
  cameras  `python -m qvl_ros.synthetic`: 3 cameras of 448x448 rgb8, no stamp jitter, reliable;
  bench    this process (malloc tuned the same way): `encode` alone on the same frames, and a
           subscription to the node's `features` that records each message's arrival and
           stamp -> arrival latency (the cameras, the node and this process share the system clock).

Measured, in alternation so that background load hits both alike:
  saturation  cameras at 1.5x the encode-alone rate; messages arrive in bursts, one per batch; once
              two full batches in a row came, sets/s = messages between two batch starts / time
              between them (quick: one window of ~8 s, full: two of ~19 s; smoke: one of ~3 s on
              the tiny model, which only checks the code). Between windows the
              cameras are paused (SIGSTOP), the node drains, and `encode` of 4 sets is timed here.
              Peak memory: the node process's peak RSS during windows against this process's
              during encode alone (both hold the model, torch and rclpy).
  1 Hz        cameras at 1 Hz, every set a batch of one: stamp -> arrival of `features` against
              `encode` of one set alone; the difference is what the node and DDS add. Frame
              arrival (stamp -> a frame reaching this process) shows the camera transport's share.

The node's internals are not touched: only its public topics count. One-off studies that led to
this setup (malloc modes, transports, per-thread CPU) are summarized in bench/studies/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAMERAS, SIZE, BATCH, QUEUE_DEPTH = 3, 448, 4, 4
PROMPT = "Describe the scene."
OVERLOAD = 1.5  # camera rate / encode-alone sets/s
TOPICS = [f"camera_{i}/image_raw" for i in range(CAMERAS)]
# Fast DDS's default shared-memory segment (512 KiB) cannot hold a 448x448 rgb8 frame (602 KB):
# frames would go over UDP loopback in fragments, and a lost fragment is repaired only with the
# writer's next sample (at 1 Hz about one frame in 30 arrived 1-2 s late). 16 MiB segments fit.
SHM_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com"><profiles>
  <transport_descriptors>
    <transport_descriptor><transport_id>shm</transport_id><type>SHM</type>
      <segment_size>16777216</segment_size></transport_descriptor>
    <transport_descriptor><transport_id>udp</transport_id><type>UDPv4</type></transport_descriptor>
  </transport_descriptors>
  <participant profile_name="node_bench" is_default_profile="true"><rtps>
    <useBuiltinTransports>false</useBuiltinTransports>
    <userTransports><transport_id>shm</transport_id><transport_id>udp</transport_id></userTransports>
  </rtps></participant>
</profiles></dds>
"""


def use_shm_transport(directory: str) -> str:
    """Fast DDS over shared memory for this process and those it starts (before rclpy.init)."""
    rmw = os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if "fastrtps" not in rmw:
        return f"{rmw} default transports"
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        path = Path(directory) / "fastdds_shm.xml"
        path.write_text(SHM_PROFILE)
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
    return "Fast DDS shared memory, 16 MiB segments"


def percentiles(values) -> dict:
    from qvl_ros.core.diagnostics import percentile

    s = sorted(values)
    return {"p50": round(percentile(s, 50), 1), "p95": round(percentile(s, 95), 1)}


def say(text: str) -> None:
    print(f"  node_bench: {text}", file=sys.stderr, flush=True)


def wait_for(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ----------------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies."""
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A module run with `python -m` in its own process, output kept; pause/resume by signals."""

    def __init__(self, args: list, env: dict | None = None):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def running(self) -> bool:
        """True, or an error with the process's output once it has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.proc.args[2]} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        return True

    def pause(self) -> None:
        self.running()
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def cameras(ns: str, rate: float) -> Child:
    return Child(["qvl_ros.synthetic", "--cameras", str(CAMERAS), "--size", f"{SIZE}x{SIZE}", "--encodings", "rgb8",
                  "--rate", f"{rate:.3f}", "--jitter-ms", "0", "--reliable", "--ros-args", "-r", f"__ns:={ns}"])


def qvl_node(ns: str, checkpoint: Path, threads: int) -> Child:
    params = {"camera_topics": "[" + ",".join(TOPICS) + "]", "prompt": PROMPT, "model.path": str(checkpoint),
              "model.device": "cpu", "model.dtype": "float32", "batch.max_size": BATCH,
              "batch.queue_depth": QUEUE_DEPTH, "qos.reliability": "reliable",
              "diagnostics.stale_after": 600.0, "log_throttle": 30.0}  # cameras pause on purpose
    args = ["qvl_ros.node", "--ros-args", "-r", f"__ns:={ns}"]
    for k, v in params.items():
        args += ["-p", f"{k}:={v}"]
    return Child(args, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


# ----------------------------------------------------------------------------- arrivals
class Arrivals:
    """Raw subscription: per message, (monotonic arrival s, stamp -> arrival ms). The header stamp
    leads both VisionFeatures and Image: after the 4-byte CDR encapsulation, int32 sec, uint32 ns."""

    def __init__(self, node, msg_type, topic: str):
        self.lock = threading.Lock()
        self.items: list = []
        self.sub = node.create_subscription(msg_type, topic, self._on_raw, 50, raw=True)

    def _on_raw(self, data: bytes) -> None:
        t, wall = time.monotonic(), time.time_ns()
        sec, nsec = struct.unpack_from("<iI" if data[1] & 1 else ">iI", data, 4)
        with self.lock:
            self.items.append((t, (wall - sec * 1_000_000_000 - nsec) * 1e-6))

    def since(self, t0: float, t1: float = float("inf")) -> list:
        with self.lock:
            return [a for a in self.items if t0 <= a[0] < t1]


def batch_starts(arrivals: list, gap: float) -> list:
    """(start time, messages) per batch: a batch's messages come within `gap` s of each other."""
    out = []
    for i, (t, _) in enumerate(arrivals):
        if i == 0 or t - arrivals[i - 1][0] > gap:
            out.append([t, 0])
        out[-1][1] += 1
    return out


def full_batches(feats: Arrivals, since: float, k: int, gap: float) -> bool:
    """k finished batches in a row after `since` were full (the queue fills only gradually);
    k = 0: one finished batch of any size (a smoke run, which measures nothing)."""
    done = batch_starts(feats.since(since), gap)[1:-1]  # the first may be partial, the last unfinished
    if k == 0:
        return len(done) >= 1
    return len(done) >= k and all(n == BATCH for _, n in done[-k:])


# ----------------------------------------------------------------------------- encode alone
def frames(device) -> list:
    """BATCH sets of CAMERAS frames: the cameras' messages converted as the node converts them."""
    from sensor_msgs.msg import Image

    from qvl_ros.core.conversion import msg_to_tensor
    from qvl_ros.sim.synthetic import encode_image, render_frame

    sets = []
    for tick in range(BATCH):
        msgs = []
        for c in range(CAMERAS):
            data, step = encode_image(render_frame(SIZE, SIZE, tick, c), "rgb8")
            msg = Image(height=SIZE, width=SIZE, encoding="rgb8", step=step, is_bigendian=0)
            msg.data = data
            msgs.append(msg)
        sets.append([msg_to_tensor(m, device).clone() for m in msgs])
    return sets


def encode_seconds(model, sets, reps: int) -> list:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.encode(sets, [PROMPT] * len(sets))
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- phases
def saturation_window(feats: Arrivals, cams: Child, node: Child, seconds: float, gap: float, full: int = 2) -> dict:
    """Cameras running: wait for `full` full batches in a row, count sets over ~`seconds`, then pause
    and drain."""
    cams.resume()
    since = time.monotonic()
    wait_for(lambda: node.running() and full_batches(feats, since, full, gap), 180, f"{full} full batches in a row")
    t0 = batch_starts(feats.since(since), gap)[-1][0]
    reset_peak_rss(node.proc.pid)
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    wait_for(lambda: batch_starts(feats.since(t0 + seconds), gap), 60, "the window's last batch")
    t1 = batch_starts(feats.since(t0 + seconds), gap)[0][0]
    peak = rss_mb(node.proc.pid)
    cams.pause()
    window = feats.since(t0, t1)
    cycle = (t1 - t0) / max(1, len(batch_starts(window, gap)))
    wait_for(lambda: time.monotonic() - max(a[0] for a in feats.since(t0)) > 1.5 * cycle + 0.5, 60, "the node to drain")
    return {"seconds": t1 - t0, "sets": len(window), "latency_ms": [ms for _, ms in window], "peak_mb": peak}


def light_load(ns: str, feats: Arrivals, frames_in: Arrivals, sets: int) -> dict:
    """Cameras at 1 Hz: stamp -> arrival of `features` and of camera frames, first two sets skipped."""
    with cameras(ns, 1.0) as cams:
        since = time.monotonic()
        wait_for(lambda: cams.running() and len(feats.since(since)) >= 2, 60, "the 1 Hz cameras")
        t0 = feats.since(since)[1][0] + 0.5
        wait_for(lambda: cams.running() and len(feats.since(t0)) >= sets, 30 + 2 * sets, f"{sets} sets at 1 Hz")
        t1 = feats.since(t0)[sets - 1][0] + 0.01
    return {"latency_ms": [ms for _, ms in feats.since(t0, t1)], "frame_ms": [ms for _, ms in frames_in.since(t0 - 1, t1)]}


@contextmanager
def ros_node(ns: str):
    """A plain rclpy node in this process, spun on its own thread, for subscriptions and graph queries."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context, args=[])
    node = rclpy.create_node("node_bench", context=context, namespace=ns)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        spinner.join(5)


def phases(bench, ns: str, node: Child, model, sets, times: dict, level: str) -> dict:
    """Saturation windows alternating with encode alone, then 1 Hz; `times` gains the encode calls."""
    from sensor_msgs.msg import Image

    from bench.memory import process_peak_mb, reset_peak
    from qvl_ros.msg import VisionFeatures

    windows, seconds, light_sets = {"smoke": (1, 3.0, 2), "quick": (1, 8.0, 4), "full": (2, 19.0, 6)}[level]
    rate = round(OVERLOAD * BATCH / min(times["batch"]), 2)  # from the fastest call: batches must fill
    gap = 0.3 * min(times["single"])
    feats = Arrivals(bench, VisionFeatures, "features")
    wait_for(lambda: node.running() and bench.count_publishers(f"{ns}/features") >= 1
             and all(bench.count_subscribers(f"{ns}/{t}") >= 1 for t in TOPICS), 180, "qvl_node")
    say(f"qvl_node is up; encode alone {1e3 * min(times['batch']):.0f} ms per {BATCH} sets, cameras at {rate} Hz")
    wins, peak_encode = [], 0.0
    with cameras(ns, rate) as cams:
        cams.pause()
        for _ in range(windows):
            wins.append(saturation_window(feats, cams, node, seconds, gap, full=0 if level == "smoke" else 2))
            say(f"window: {wins[-1]['sets']} sets in {wins[-1]['seconds']:.1f} s")
            reset_peak()
            times["batch"] += encode_seconds(model, sets, 2)
            peak_encode = max(peak_encode, process_peak_mb())
    times["single"] += encode_seconds(model, sets[:1], 2)
    light = light_load(ns, feats, Arrivals(bench, Image, TOPICS[0]), light_sets)
    say(f"1 Hz: {len(light['latency_ms'])} sets")
    return {"node_sets_per_s": sum(w["sets"] for w in wins) / sum(w["seconds"] for w in wins),
            "camera_rate_hz": rate, "window_s": round(sum(w["seconds"] for w in wins), 1),
            "latency_ms_saturation": percentiles(ms for w in wins for ms in w["latency_ms"]),
            "peak_mb": {"node": round(max(w["peak_mb"] for w in wins), 1), "encode": round(peak_encode, 1)},
            "light": light}


def measure(level: str, threads: int) -> dict:
    """The whole measurement; this process's malloc is tuned by the caller before torch allocates."""
    import torch

    from qvl_ros.model import PRESETS, BatchedQwenVL, save_tiny_checkpoint

    torch.set_num_threads(threads)
    ns = f"/node_bench_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="node_bench_") as tmp:
        transport = use_shm_transport(tmp)
        preset = "tiny" if level == "smoke" else "small"
        ckpt = save_tiny_checkpoint(Path(tmp) / preset, config=PRESETS[preset], seed=0)
        with qvl_node(ns, ckpt, threads) as node:  # loads the model while this process loads its own
            model = BatchedQwenVL.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
            sets = frames(torch.device("cpu"))
            encode_seconds(model, sets, 1)  # warm-up, both batch sizes
            encode_seconds(model, sets[:1], 1)
            times = {"batch": encode_seconds(model, sets, 2), "single": encode_seconds(model, sets[:1], 3)}
            with ros_node(ns) as bench:
                result = phases(bench, ns, node, model, sets, times, level)
    single = sorted(times["single"])
    return {**result, "encode_sets_per_s": BATCH * len(times["batch"]) / sum(times["batch"]),
            "encode_ms_one_set": 1e3 * single[len(single) // 2], "transport": transport, "torch_threads": threads}


# ----------------------------------------------------------------------------- rows
def rows(r: dict, level: str = "full") -> list[dict]:
    """The two rows bench/run.py reports: sets/s at saturation and latency p50 at 1 Hz."""
    common = {"cameras": CAMERAS, "size": f"{SIZE}x{SIZE}", "encoding": "rgb8",
              "model": "tiny" if level == "smoke" else "small", "malloc": "tuned"}
    error = "encode within 1e-4 (test_node)"
    single = r["encode_ms_one_set"]
    lat = percentiles(r["light"]["latency_ms"])
    saturation = {
        "params": {**common, "batch": BATCH, "queue_depth": QUEUE_DEPTH, "camera_rate_hz": r["camera_rate_hz"],
                   "metric": "sets/s at saturation", "window_s": r["window_s"],
                   "reference": "BatchedQwenVL.encode alone, same frames, malloc tuned as qvl_node"},
        "ours": r["node_sets_per_s"], "reference": r["encode_sets_per_s"], "unit": "sets/s", "error": error,
        "peak_mem_mb": {"ours": r["peak_mb"]["node"], "reference": r["peak_mb"]["encode"]},
        "peak_mem_kind": "process peak RSS (model, torch, rclpy included): node process during windows / "
                         "encode alone",
        "overhead_pct_of_encode_time": round(100 * (r["encode_sets_per_s"] / r["node_sets_per_s"] - 1), 1),
        "latency_ms_saturation": r["latency_ms_saturation"], "transport": r["transport"],
        "torch_threads": r["torch_threads"]}
    latency = {
        "params": {**common, "rate_hz": 1.0, "sets": len(r["light"]["latency_ms"]), "metric": "latency p50",
                   "reference": "BatchedQwenVL.encode of one set alone"},
        "ours": lat["p50"], "reference": single, "unit": "ms", "lower_is_better": True, "error": error,
        "latency_ms": lat, "added_latency_ms": {k: round(v - single, 1) for k, v in lat.items()},
        "frame_arrival_ms": percentiles(r["light"]["frame_ms"])}
    return [saturation, latency]


def child(level: str, threads: int, timeout: float) -> dict:
    """One measurement in a fresh process: malloc must be tuned before torch allocates."""
    with tempfile.TemporaryDirectory(prefix="node_bench_out_") as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--threads", str(threads), "--json", str(out)]
        proc = subprocess.Popen(cmd + ([] if level == "full" else [f"--{level}"]))
        try:
            if proc.wait(timeout) != 0:
                raise RuntimeError(f"node benchmark exited with {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.terminate()  # its clean-up stops the node and camera processes
                proc.wait(30)
        return json.loads(out.read_text())


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """Rows for bench/run.py (quick: one ~8 s window and 4 sets at 1 Hz; full: two ~19 s windows, 6 sets;
    smoke: one ~3 s window and 2 sets on the tiny model)."""
    import torch

    level = "smoke" if smoke else "quick" if quick else "full"
    return rows(child(level, torch.get_num_threads(), 600 if level == "full" else 420), level)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one window of ~8 s (else two of ~19 s)")
    ap.add_argument("--smoke", action="store_true", help="one window of ~3 s on the tiny model (checks the code)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, here and in the node")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    level = "smoke" if a.smoke else "quick" if a.quick else "full"
    if a.child:
        from qvl_ros.model.kernels import tune_cpu_allocator

        tune_cpu_allocator()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the clean-up
        Path(a.json).write_text(json.dumps(measure(level, a.threads)))
        return 0
    out = rows(child(level, a.threads, 600 if level == "full" else 420), level)
    for r in out:
        p = r["params"]
        print(f"{p['metric']:22s} node {r['ours']:8.2f} {r['unit']:6s} encode alone {r['reference']:8.2f}  "
              + json.dumps({k: v for k, v in r.items() if k not in ("params", "ours", "reference", "unit", "error")}))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
