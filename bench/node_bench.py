"""qvl_node at saturation and at light load, against `BatchedQwenVL.encode` alone.

    scripts/run.sh python bench/node_bench.py [--quick] [--malloc default|mmap|tuned ...]
                                              [--transport shm|default] [--json FILE]

Setup, one fresh process per malloc mode (the mode must be set before torch allocates):
  model    the "small" benchmark config (docs/architecture.md), random weights, float32, CPU;
  cameras  `python -m qvl_ros.sim.synthetic` in a separate process (same ROS_DOMAIN_ID, localhost
           discovery): 3 cameras of 448x448 rgb8 (multiples of 28, so no resize), no stamp
           jitter, reliable QoS; the node subscribes reliably as well, so no frame is lost
           between the processes; Fast DDS over shared memory with segments that hold a frame
           (see SHM_PROFILE; --transport default for the stock transports);
  node     `QvlNode` in this process over real DDS, spun by a SingleThreadedExecutor on its own
           thread (as `qvl_node`'s main does), batch.max_size 4, batch.queue_depth 4, plus a raw
           subscription to its `features` that counts what arrives.

Measured, in alternation so that background load hits both alike:
  encode   `encode` on the same frames (the node's own conversion of the same messages), 4 sets
           per call, on the main thread; also on a non-main thread, the way the node's batch
           worker calls it, and for one set (the light-load reference);
  node     the cameras publish at 1.5x the encode-alone rate; sets/s is counted between batch
           completions over a window that starts once batches are full (the queue fills only
           gradually after a start or a pause); the camera process is paused (SIGSTOP) and the
           node drained while encode is timed between windows (quick: one window of ~9 s,
           full: two of ~20 s);
  light    a second camera process at 1 Hz (started paused at the beginning): every set is a
           batch of one; added latency = latency - encode time of one set alone.

The overhead is encode-alone sets/s / node sets/s - 1 (target <= 10%). Latency is stamp -> publish (the set stamp is the newest camera stamp; the node's clock and the
cameras' are the same system clock). The node's own work is measured from wrappers installed on
the instance (no change to the node): CPU time of the camera callbacks (conversion,
synchronizer, queueing), of message building + publish, the model call, and per-thread CPU time
from /proc for the executor thread (take + deserialize + callbacks), the batch worker, torch's
pool threads and DDS threads (CPU and time spent runnable waiting for a core), plus the camera
process and the rest of the machine.

malloc modes (glibc):
  default  as shipped;
  mmap     M_MMAP_THRESHOLD 256 MiB + M_TRIM_THRESHOLD 512 MiB: large tensors reuse heap memory
           instead of a fresh mmap (page faults) per allocation; only the main thread's arena
           benefits: a non-main thread's arena cannot hold blocks above its 64 MiB heap size;
  tuned    mmap + M_ARENA_MAX 1, so the batch worker thread allocates from the main arena too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAMERAS = 3
SIZE = 448
BATCH = 4
QUEUE_DEPTH = 4
PROMPT = "Describe the scene."
OVERLOAD = 1.5          # camera rate / encode-alone sets/s
TARGET_OVERHEAD = 0.10  # node overhead <= 10% of encode time at saturation
MALLOC_MODES = ("default", "mmap", "tuned")
# Fast DDS transports for both processes (--transport shm, unless FASTDDS_DEFAULT_PROFILES_FILE
# is set): shared memory with 16 MiB segments, UDP for discovery. Fast DDS's default segment
# (512 KiB) cannot hold a 448x448 rgb8 frame (602 KB), so frames go over UDP loopback in
# fragments; a lost fragment is repaired only with the writer's next sample, so at 1 Hz about one
# frame in 30 arrives 1-2 s late even at an idle subscriber (best effort loses most frames).
# That is transport set-up, not the node; --transport default measures it as it comes.
SHM_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor><transport_id>shm_16mib</transport_id><type>SHM</type>
        <segment_size>16777216</segment_size></transport_descriptor>
      <transport_descriptor><transport_id>udp</transport_id><type>UDPv4</type></transport_descriptor>
    </transport_descriptors>
    <participant profile_name="node_bench" is_default_profile="true">
      <rtps>
        <useBuiltinTransports>false</useBuiltinTransports>
        <userTransports><transport_id>shm_16mib</transport_id><transport_id>udp</transport_id></userTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
"""
TRANSPORTS = ("shm", "default")


def apply_transport(mode: str, directory: str) -> str:
    """Select the DDS transport for this process and the camera process it starts; returns a
    description. Call before rclpy creates a node."""
    rmw = os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if mode == "default" or "fastrtps" not in rmw:
        return f"{rmw} default transports"
    if os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        return f"Fast DDS profile {os.environ['FASTDDS_DEFAULT_PROFILES_FILE']} (from the environment)"
    path = Path(directory) / "fastdds_shm.xml"
    path.write_text(SHM_PROFILE)
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
    return "Fast DDS shared memory, 16 MiB segments (+ UDP for discovery)"

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MALLOC_DESC = {
    "default": "glibc defaults",
    "mmap": "M_MMAP_THRESHOLD 256 MiB, M_TRIM_THRESHOLD 512 MiB",
    "tuned": "M_MMAP_THRESHOLD 256 MiB, M_TRIM_THRESHOLD 512 MiB, M_ARENA_MAX 1",
}


def apply_malloc(mode: str) -> None:
    """Set glibc malloc parameters for this process (call before torch allocates)."""
    if mode == "default":
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)
    if mode == "tuned":
        ok = ok and libc.mallopt(_M_ARENA_MAX, 1)
    if not ok:
        raise RuntimeError(f"mallopt refused the {mode!r} settings")


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies."""
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pct(values, q):
    from qvl_ros.core.diagnostics import percentile

    return percentile(sorted(values), q)


# ----------------------------------------------------------------------------- CPU accounting
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict:
    """{tid: (name, cpu s, run-queue wait s)} for every thread of this process (schedstat, ns):
    the wait is time the thread was runnable but another one had its core."""
    out = {}
    base = "/proc/self/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"{base}/{tid}/schedstat") as f:
                run_ns, wait_ns = (int(v) for v in f.read().split()[:2])
        except (OSError, ValueError, IndexError):
            continue
        out[int(tid)] = (name, run_ns * 1e-9, wait_ns * 1e-9)
    return out


def _process_cpu(pid: int) -> float:
    """user + system CPU seconds of a whole process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return math.nan


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return (total - idle) / _CLK_TCK


def _self_stat() -> tuple:
    """(user s, system s, minor page faults) of this process."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK, int(fields[7])


class CpuSnapshot:
    def __init__(self, publisher_pid=None):
        self.t = time.perf_counter()
        self.threads = _thread_cpu()
        self.process = sum(s for _, s, _ in self.threads.values())
        self.user, self.sys, self.minflt = _self_stat()
        self.publisher = _process_cpu(publisher_pid) if publisher_pid else math.nan
        self.machine = _machine_busy()


def cpu_breakdown(a: CpuSnapshot, b: CpuSnapshot, roles: dict) -> dict:
    """CPU seconds between two snapshots, grouped: roles maps tid -> role name; other threads
    are grouped as 'torch pool' (unnamed, i.e. named like the interpreter) or by name prefix."""
    groups: dict = {}
    waits: dict = {}
    exe = a.threads.get(os.getpid(), ("python", 0, 0))[0]
    for tid, (name, sec, wait) in b.threads.items():
        _, sec0, wait0 = a.threads.get(tid, (name, 0.0, 0.0))
        if tid in roles:
            g = roles[tid]
        elif name == exe:
            g = "torch pool threads"
        else:
            g = "other threads: " + name.split(".")[0].rstrip("0123456789-_")
        groups[g] = groups.get(g, 0.0) + sec - sec0
        waits[g] = waits.get(g, 0.0) + wait - wait0
    process = b.process - a.process
    publisher = b.publisher - a.publisher
    machine = b.machine - a.machine
    rest = machine - process - (publisher if not math.isnan(publisher) else 0.0)
    return {"wall_s": b.t - a.t, "groups": groups, "runqueue_wait": waits, "process_s": process,
            "publisher_s": publisher,
            "machine_busy_s": machine, "other_processes_s": max(0.0, rest), "sys_s": b.sys - a.sys,
            "minflt": b.minflt - a.minflt}


# ----------------------------------------------------------------------------- instrumentation
class _PublishProbe:
    """Stands in for the node's features publisher: records publish time against the stamp."""

    def __init__(self, pub, probe):
        self._pub = pub
        self._probe = probe

    def publish(self, msg):
        self._pub.publish(msg)
        t = time.time_ns()
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        with self._probe.lock:
            self._probe.published.append((time.perf_counter(), (t - stamp) * 1e-9, stamp))

    def __getattr__(self, name):
        return getattr(self._pub, name)


class NodeProbe:
    """Wrappers on one QvlNode instance: camera callbacks, model call, publish path."""

    def __init__(self, node):
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.frames = []     # (perf_counter end, wall s, cpu s, stamp -> callback s) per camera callback
        self.batches = []    # dict per batch: t_end, size, infer_s, infer_cpu_s, publish_s, publish_cpu_s
        self.published = []  # (perf_counter, stamp -> publish latency s, stamp ns) per features message
        self.worker_tid = None
        self._infer_last = None
        self._max_size = int(node.get_parameter("batch.max_size").value)
        on_frame, infer, publish = node._on_frame, node._infer, node._publish

        def on_frame_probe(index, msg):
            arrival = (time.time_ns() - int(msg.header.stamp.sec) * 1_000_000_000
                       - int(msg.header.stamp.nanosec)) * 1e-9
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                on_frame(index, msg)
            finally:
                t1, c1 = time.perf_counter(), time.thread_time()
                with self.lock:
                    self.frames.append((t1, t1 - t0, c1 - c0, arrival))

        def infer_probe(sets, settings):
            self.worker_tid = threading.get_native_id()
            t0, c0 = time.perf_counter(), time.thread_time()
            out = infer(sets, settings)
            self._infer_last = (t0, time.perf_counter() - t0, time.thread_time() - c0)
            return out

        def publish_probe(sets, results, settings):
            t0, c0 = time.perf_counter(), time.thread_time()
            publish(sets, results, settings)
            t1, c1 = time.perf_counter(), time.thread_time()
            t_infer, infer_s, infer_cpu = self._infer_last or (math.nan, math.nan, math.nan)
            with self.cond:
                self.batches.append({"t_start": t_infer, "t_end": t1, "size": len(sets), "infer_s": infer_s,
                                     "infer_cpu_s": infer_cpu, "publish_s": t1 - t0, "publish_cpu_s": c1 - c0})
                self.cond.notify_all()

        node._on_frame = on_frame_probe
        node._infer = infer_probe
        node._publish = publish_probe
        node._features_pub = _PublishProbe(node._features_pub, self)

    def batch_count(self) -> int:
        with self.lock:
            return len(self.batches)

    def wait_batches(self, n: int, timeout: float) -> float:
        """Wait until n more batches have completed; returns the completion time of the last."""
        end = time.monotonic() + timeout
        with self.cond:
            target = len(self.batches) + n
            while len(self.batches) < target:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the node completed {len(self.batches) - target + n} of {n} batches "
                                       f"in {timeout:.0f} s")
                self.cond.wait(left)
            return self.batches[target - 1]["t_end"]

    def wait_full(self, k: int, timeout: float) -> float:
        """Wait until k batches in a row, completed from now on, were full (the queue has filled up
        after a start or a pause: batches grow only gradually from one set); returns the last
        one's completion time."""
        end = time.monotonic() + timeout
        with self.cond:
            first = len(self.batches)
            while (len(self.batches) - first < k
                   or any(b["size"] < self._max_size for b in self.batches[-k:])):
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {k} full batches in a row within {timeout:.0f} s")
                self.cond.wait(left)
            return self.batches[-1]["t_end"]

    def window(self, t0: float, t1: float) -> dict:
        with self.lock:
            batches = [b for b in self.batches if t0 < b["t_end"] <= t1]
            frames = [f for f in self.frames if t0 < f[0] <= t1]
            pub = [(lat, stamp) for t, lat, stamp in self.published if t0 < t <= t1]
        return {"batches": batches, "frames": frames, "latency": [lat for lat, _ in pub],
                "stamps": [stamp for _, stamp in pub]}


class _Counter:
    """Raw subscription to the node's features: counts messages and their stamp -> receive time."""

    def __init__(self, context, topic: str):
        from rclpy.node import Node

        from qvl_ros.msg import VisionFeatures

        self.node = Node("node_bench_counter", context=context)
        self.lock = threading.Lock()
        self.received = {}  # stamp ns -> stamp -> receive latency s
        self.node.create_subscription(VisionFeatures, topic, self._on_raw, 50, raw=True)

    def _on_raw(self, data: bytes) -> None:
        t = time.time_ns()
        # CDR: 4-byte encapsulation header, then header.stamp (int32 sec, uint32 nanosec)
        sec, nsec = struct.unpack_from("<iI" if data[1] & 1 else ">iI", data, 4)
        stamp = sec * 1_000_000_000 + nsec
        with self.lock:
            self.received[stamp] = (t - stamp) * 1e-9

    def latencies(self, stamps) -> list:
        """Receive latencies of the messages with these stamps that arrived."""
        with self.lock:
            return [self.received[s] for s in stamps if s in self.received]


class CameraProcess:
    """`python -m qvl_ros.sim.synthetic` in its own process; pause/resume by SIGSTOP/SIGCONT."""

    def __init__(self, namespace: str, rate: float):
        cmd = [sys.executable, "-m", "qvl_ros.synthetic", "--cameras", str(CAMERAS), "--size", f"{SIZE}x{SIZE}",
               "--encodings", "rgb8", "--rate", f"{rate:.3f}", "--jitter-ms", "0", "--reliable",
               "--ros-args", "-r", f"__ns:={namespace}"]
        self.rate = rate
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.paused = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"camera process exited with {self.proc.returncode}: {self.output()[-2000:]}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until its publishers exist (it logs one line then; its first tick follows one period later)."""
        _wait(lambda: self.check() or "publishing" in self.output(), timeout, "the camera process to start")

    def pause(self) -> None:
        self.check()
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.paused:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


# ----------------------------------------------------------------------------- measurement
def _frames(device):
    """BATCH sets of CAMERAS frames: synthetic rgb8 messages converted as the node converts them."""
    from sensor_msgs.msg import Image

    from qvl_ros.core.conversion import msg_to_tensor
    from qvl_ros.sim.synthetic import encode_image, render_frame

    sets = []
    for tick in range(BATCH):
        cams = []
        for c in range(CAMERAS):
            data, step = encode_image(render_frame(SIZE, SIZE, tick, c), "rgb8")
            msg = Image(height=SIZE, width=SIZE, encoding="rgb8", step=step, is_bigendian=0)
            msg.data = data
            cams.append(msg_to_tensor(msg, device).clone())
        sets.append(cams)
    return sets


class EncodeAlone:
    """Times `encode` on the same frames: 4 sets on the main thread and on a persistent non-main
    thread (as the node's batch worker), and one set on the main thread. Per call: wall time and,
    process-wide (the process is otherwise idle then), CPU, system CPU and minor page faults."""

    def __init__(self, model, sets):
        from concurrent.futures import ThreadPoolExecutor

        self.model = model
        self.sets = sets
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode_alone")
        self.helper_tid = self.pool.submit(threading.get_native_id).result()
        self.main, self.thread, self.single = [], [], []  # dicts: wall_s, cpu_s, sys_s, minflt

    def _call(self, sets) -> float:
        t0 = time.perf_counter()
        self.model.encode(sets, [PROMPT] * len(sets))
        return time.perf_counter() - t0

    def _timed(self, fn) -> dict:
        u0, s0, f0 = _self_stat()
        m0, t0 = _machine_busy(), _thread_cpu()
        wall = fn()
        m1, t1 = _machine_busy(), _thread_cpu()
        u1, s1, f1 = _self_stat()
        wait = sum(w - t0.get(tid, (n, 0.0, 0.0))[2] for tid, (n, _, w) in t1.items())
        return {"wall_s": wall, "cpu_s": u1 - u0 + s1 - s0, "sys_s": s1 - s0, "minflt": f1 - f0,
                "machine_busy_cores": (m1 - m0) / wall, "runqueue_wait_s": wait}

    def block(self, n_main: int, n_thread: int, n_single: int, record: bool = True) -> None:
        runs = ([(self.main, lambda: self._call(self.sets))] * n_main
                + [(self.thread, lambda: self.pool.submit(self._call, self.sets).result())] * n_thread
                + [(self.single, lambda: self._call(self.sets[:1]))] * n_single)
        for store, fn in runs:
            r = self._timed(fn)
            if record:
                store.append(r)

    def median(self, which: str, key: str = "wall_s") -> float:
        values = [r[key] for r in getattr(self, which)]
        return statistics.median(values) if values else math.nan

    def rate(self, which: str) -> float:
        """sets/s over all recorded calls (total sets / total time)."""
        runs = getattr(self, which)
        return BATCH * len(runs) / sum(r["wall_s"] for r in runs) if runs else math.nan

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _wait(pred, timeout: float, what: str, period: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(period)


def measure(quick: bool = False, malloc: str = "default", threads: int | None = None,
            transport: str = "shm") -> dict:
    """The whole measurement in this process (malloc mode already applied by the caller)."""
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    ns = f"/node_bench_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="node_bench_dds_") as dds_dir:
        transport_desc = apply_transport(transport, dds_dir)
        # The 1 Hz cameras start now, while the model loads, and wait paused (SIGSTOP) for the
        # light-load phase: no process start-up inside the measurement.
        slow_cams = CameraProcess(ns, 1.0)
        try:
            slow_cams.wait_ready()
            slow_cams.pause()
            result = _measure(quick, malloc, threads, ns, slow_cams, t_start, load)
        finally:
            slow_cams.stop()
    result["transport"] = transport_desc
    return result


def _measure(quick, malloc, threads, ns, slow_cams, t_start, load) -> dict:
    import rclpy
    import torch
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from bench.memory import process_peak_mb, reset_peak
    from qvl_ros.model import PRESETS, BatchedQwenVL, save_tiny_checkpoint
    from qvl_ros.ros.node import QvlNode

    if threads:
        torch.set_num_threads(int(threads))
    # A window ends at the first batch completion after segment_s, i.e. about half a batch later.
    plan = {"segments": 1 if quick else 2, "segment_s": 8.0 if quick else 19.0, "warmup_batches": 2,
            "encode_main": 2, "encode_thread": 1, "encode_single": 2, "light_sets": 2 if quick else 6}
    device = torch.device("cpu")
    tmp = tempfile.TemporaryDirectory(prefix="node_bench_")
    ckpt = save_tiny_checkpoint(Path(tmp.name) / "small", config=PRESETS["small"], seed=0)
    model = BatchedQwenVL.from_pretrained(ckpt, device=device, dtype=torch.float32)
    sets = _frames(device)
    enc = EncodeAlone(model, sets)
    enc.block(1, 1, 1, record=False)  # warm-up: both threads, both batch sizes
    enc.block(plan["encode_main"], plan["encode_thread"], plan["encode_single"])
    encode_rate0 = BATCH / enc.median("main")
    # The camera rate comes from the fastest call: a first block slowed by other load would set
    # cameras slower than the node later runs, and batches would never fill.
    rate = round(OVERLOAD * BATCH / min(r["wall_s"] for r in enc.main), 2)

    context = rclpy.Context()
    rclpy.init(context=context, args=[])
    executor = SingleThreadedExecutor(context=context)
    node = counter = cams = None
    roles = {threading.get_native_id(): "main thread (idle)", enc.helper_tid: "encode-alone thread (idle)"}
    exec_tid = []
    spin_thread = None
    try:
        node = QvlNode(model=model, context=context, namespace=ns, parameter_overrides=[
            Parameter("camera_topics", value=[f"camera_{i}/image_raw" for i in range(CAMERAS)]),
            Parameter("prompt", value=PROMPT),
            Parameter("batch.max_size", value=BATCH),
            Parameter("batch.queue_depth", value=QUEUE_DEPTH),
            Parameter("qos.reliability", value="reliable"),
            Parameter("diagnostics.stale_after", value=600.0),  # the cameras pause on purpose
            Parameter("log_throttle", value=30.0)])
        probe = NodeProbe(node)
        counter = _Counter(context, f"{ns}/features")
        executor.add_node(node)
        executor.add_node(counter.node)

        def spin():
            exec_tid.append(threading.get_native_id())
            executor.spin()

        spin_thread = threading.Thread(target=spin, name="executor", daemon=True)
        spin_thread.start()
        topics = node.camera_topics

        # ---------------------------------------------------------------- saturation
        cams = CameraProcess(ns, rate)
        _wait(lambda: cams.check() or all(counter.node.count_publishers(t) >= 1 for t in topics), 30,
              "the camera process")
        probe.wait_full(plan["warmup_batches"], 120)
        _wait(lambda: probe.worker_tid is not None and bool(exec_tid), 5, "thread ids")
        roles.update({exec_tid[0]: "executor thread", probe.worker_tid: "batch worker thread"})
        segments = []
        peak_rss = {"node": 0.0, "encode": 0.0}  # process peak RSS, MB, during node windows / encode alone
        for seg in range(plan["segments"]):
            if seg:
                cams.resume()
                probe.wait_full(1, 120)  # the queue refills after the pause
            t0 = probe.wait_batches(1, 60)
            reset_peak()
            a = CpuSnapshot(cams.pid)
            stats0 = node.pipeline_stats()
            time.sleep(max(0.0, plan["segment_s"] - (time.perf_counter() - t0)))
            t1 = probe.wait_batches(1, 60)
            peak_rss["node"] = max(peak_rss["node"], process_peak_mb())
            b = CpuSnapshot(cams.pid)
            stats1 = node.pipeline_stats()
            cams.pause()
            load.append(os.getloadavg()[0])
            segments.append({"t0": t0, "t1": t1, "window": probe.window(t0, t1), "cpu": cpu_breakdown(a, b, roles),
                             "frames_received": _frames_in(stats1) - _frames_in(stats0),
                             "queue_full_drops": stats1["batch"]["drops"]["queue_full"]
                             - stats0["batch"]["drops"]["queue_full"]})
            if not node.wait_idle(60):
                raise TimeoutError("the node did not drain")
            time.sleep(0.2)
            reset_peak()
            enc.block(plan["encode_main"], plan["encode_thread"], plan["encode_single"])
            peak_rss["encode"] = max(peak_rss["encode"], process_peak_mb())
        cams.stop()
        cams = None

        # ---------------------------------------------------------------- light load (1 Hz)
        slow_cams.resume()
        probe.wait_batches(1, 30)
        t0 = probe.wait_batches(1, 30)
        t1 = probe.wait_batches(plan["light_sets"], 30 + 2 * plan["light_sets"])
        light = probe.window(t0, t1)
        slow_cams.pause()
        load.append(os.getloadavg()[0])
        time.sleep(0.5)  # the last features messages reach the counter
        for s in segments:
            w = s["window"]
            s["counter_latency"] = counter.latencies(w["stamps"])
        light["counter_latency"] = counter.latencies(light["stamps"])
        result = _summarize(plan, segments, light, enc, rate, encode_rate0)
        result["process_peak_rss_mb"] = peak_rss
    finally:
        if cams is not None:
            cams.stop()
        if node is not None:
            node.destroy_node()
        if counter is not None:
            counter.node.destroy_node()
        executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown(context=context)
        if spin_thread is not None:
            spin_thread.join(5)
        enc.close()
        tmp.cleanup()
    result.update({
        "malloc": malloc, "malloc_settings": _MALLOC_DESC[malloc], "device": "cpu",
        "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
        "load_avg_1min": load, "elapsed_s": time.perf_counter() - t_start, "quick": quick,
        "rmw": os.environ.get("RMW_IMPLEMENTATION") or _rmw(), "ros_domain_id": os.environ.get("ROS_DOMAIN_ID"),
    })
    return result


def _frames_in(stats: dict) -> int:
    return sum(c["received"] for c in stats["monitor"]["cameras"])


def _rmw() -> str:
    try:
        from rclpy.utilities import get_rmw_implementation_identifier

        return get_rmw_implementation_identifier()
    except Exception:
        return "?"


def _summarize(plan, segments, light, enc, rate, encode_rate0) -> dict:
    seg_out = []
    for s in segments:
        w, cpu = s["window"], s["cpu"]
        span = s["t1"] - s["t0"]
        n = sum(b["size"] for b in w["batches"])
        per_set = lambda sec: 1e3 * sec / n if n else math.nan  # noqa: E731
        groups = {k: per_set(v) for k, v in sorted(cpu["groups"].items())}
        publish_cpu = per_set(sum(b["publish_cpu_s"] for b in w["batches"]))
        executor = sum(v for k, v in groups.items() if k.startswith("executor"))
        dds = sum(v for k, v in groups.items() if k.startswith("other threads"))
        worker = groups.get("batch worker thread", 0.0)
        seg_out.append({
            "window_s": span, "sets": n, "batches": len(w["batches"]), "sets_per_s": n / span,
            "batch_size_mean": n / max(1, len(w["batches"])),
            "received_by_counter": len(s["counter_latency"]), "frames_received": s["frames_received"],
            "queue_full_drops": s["queue_full_drops"],
            "latency_ms": {"p50": 1e3 * _pct(w["latency"], 50), "p95": 1e3 * _pct(w["latency"], 95)},
            "receive_latency_ms": {"p50": 1e3 * _pct(s["counter_latency"], 50),
                                   "p95": 1e3 * _pct(s["counter_latency"], 95)},
            "model_ms_per_batch": 1e3 * statistics.median([b["infer_s"] for b in w["batches"]]),
            # per batch: sets, model call ms, message building + publish ms, hand-over to the next batch ms
            "timeline_ms": [[b["size"], round(1e3 * b["infer_s"], 1), round(1e3 * b["publish_s"], 1),
                             round(1e3 * (nb["t_start"] - b["t_end"]), 1)]
                            for b, nb in zip(w["batches"], w["batches"][1:] + [None]) if nb is not None],
            "cycle_ms_per_batch": 1e3 * span / max(1, len(w["batches"])),
            "publish_ms_per_set": per_set(sum(b["publish_s"] for b in w["batches"])),
            "callback_ms_per_frame": 1e3 * statistics.median([f[1] for f in w["frames"]]) if w["frames"] else math.nan,
            "cpu_ms_per_set": groups,
            "node_work_cpu_ms_per_set": {
                "callbacks": per_set(sum(f[2] for f in w["frames"])),
                "executor_thread": executor,
                "messages_and_publish": publish_cpu,
                "dds_threads": dds,
                "total": executor + publish_cpu + dds},
            "model_cpu_ms_per_set": worker - publish_cpu + groups.get("torch pool threads", 0.0),
            "model_runqueue_wait_ms_per_set": per_set(cpu["runqueue_wait"].get("batch worker thread", 0.0)
                                                      + cpu["runqueue_wait"].get("torch pool threads", 0.0)),
            "model_wall_ms_per_set": per_set(sum(b["infer_s"] for b in w["batches"])),
            "process_cpu_ms_per_set": per_set(cpu["process_s"]),
            "process_sys_ms_per_set": per_set(cpu["sys_s"]),
            "minor_faults_per_set": cpu["minflt"] / n if n else math.nan,
            "camera_process_cpu_ms_per_set": per_set(cpu["publisher_s"]),
            "other_processes_cpu_ms_per_set": per_set(cpu["other_processes_s"]),
            "machine_busy_cores": cpu["machine_busy_s"] / cpu["wall_s"],
            "other_processes_cores": cpu["other_processes_s"] / cpu["wall_s"],
        })
    node_rate = sum(s["sets"] for s in seg_out) / sum(s["window_s"] for s in seg_out)
    main_rate = enc.rate("main")
    single_ms = 1e3 * enc.median("single")
    light_lat = [1e3 * v for v in light["latency"]]
    light_model = [1e3 * b["infer_s"] for b in light["batches"]]
    outside = [a - m for a, m in zip(light_lat, light_model)]
    overhead = main_rate / node_rate - 1.0
    med = lambda f: statistics.median([f(s) for s in seg_out])  # noqa: E731
    return {
        "node_sets_per_s": node_rate,
        "encode_sets_per_s": main_rate,
        "encode_thread_sets_per_s": enc.rate("thread"),
        "encode_sets_per_s_first_block": encode_rate0,
        "ratio": node_rate / main_rate,
        "overhead_pct_of_encode_time": 100 * overhead,
        "target_met": overhead <= TARGET_OVERHEAD,
        "camera_rate_hz": rate,
        "encode_alone": {
            which: {"ms_per_call": [round(1e3 * r["wall_s"], 1) for r in getattr(enc, which)],
                    "cpu_ms_per_set": 1e3 * enc.median(which, "cpu_s") / (1 if which == "single" else BATCH),
                    "sys_ms_per_set": 1e3 * enc.median(which, "sys_s") / (1 if which == "single" else BATCH),
                    "minor_faults_per_set": enc.median(which, "minflt") / (1 if which == "single" else BATCH),
                    "machine_busy_cores": enc.median(which, "machine_busy_cores"),
                    "runqueue_wait_ms_per_set": 1e3 * enc.median(which, "runqueue_wait_s")
                    / (1 if which == "single" else BATCH)}
            for which in ("main", "thread", "single")},
        "encode_ms_per_batch_main": 1e3 * enc.median("main"),
        "encode_ms_per_batch_thread": 1e3 * enc.median("thread"),
        "encode_ms_one_set": single_ms,
        "model_ms_per_batch_node": med(lambda s: s["model_ms_per_batch"]),
        "latency_ms_saturation": {"p50": med(lambda s: s["latency_ms"]["p50"]),
                                  "p95": max(s["latency_ms"]["p95"] for s in seg_out)},
        "node_work_cpu_ms_per_set": {k: med(lambda s: s["node_work_cpu_ms_per_set"][k])
                                     for k in seg_out[0]["node_work_cpu_ms_per_set"]},
        "segments": seg_out,
        "light": {"rate_hz": 1.0, "sets": len(light_lat), "batch_sizes": [b["size"] for b in light["batches"]],
                  "latency_ms": {"p50": _pct(light_lat, 50), "p95": _pct(light_lat, 95)},
                  "receive_latency_ms": {"p50": 1e3 * _pct(light["counter_latency"], 50),
                                         "p95": 1e3 * _pct(light["counter_latency"], 95)},
                  "model_ms_in_node": {"p50": _pct(light_model, 50), "p95": _pct(light_model, 95)},
                  "added_ms": {"p50": _pct(light_lat, 50) - single_ms, "p95": _pct(light_lat, 95) - single_ms},
                  "outside_model_ms": {"p50": _pct(outside, 50), "p95": _pct(outside, 95)},
                  "frame_arrival_ms": {"p50": 1e3 * _pct([f[3] for f in light["frames"]], 50),
                                       "p95": 1e3 * _pct([f[3] for f in light["frames"]], 95)},
                  "callback_ms_per_frame": 1e3 * _pct([f[1] for f in light["frames"]], 50)},
        "plan": plan,
    }


# ----------------------------------------------------------------------------- drivers
def _child(quick: bool, malloc: str, threads: int | None, timeout: float, transport: str = "shm") -> dict:
    """One measurement in a fresh process (the malloc mode must precede torch's allocations)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--malloc", malloc, "--transport", transport,
           "--json", str(out)]
    if quick:
        cmd.append("--quick")
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    try:
        code = proc.wait(timeout)
        if code != 0:
            raise RuntimeError(f"node benchmark ({malloc}) exited with {code}")
        return json.loads(out.read_text())
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.unlink(missing_ok=True)


def _row(r: dict) -> dict:
    light = r["light"]
    return {
        "params": {"cameras": CAMERAS, "size": f"{SIZE}x{SIZE}", "encoding": "rgb8", "batch": BATCH,
                   "queue_depth": QUEUE_DEPTH, "camera_rate_hz": r["camera_rate_hz"], "model": "small",
                   "malloc": r["malloc"], "metric": "sets/s at saturation",
                   "window_s": round(sum(s["window_s"] for s in r["segments"]), 1),
                   "reference": "BatchedQwenVL.encode alone, main thread, same frames, same process"},
        "ours": r["node_sets_per_s"], "reference": r["encode_sets_per_s"], "unit": "sets/s",
        "error": "encode within 1e-4 (test_node)",
        "peak_mem_mb": {"ours": round(r["process_peak_rss_mb"]["node"], 1),
                        "reference": round(r["process_peak_rss_mb"]["encode"], 1)},
        "peak_mem_kind": "process peak RSS (model, torch, rclpy included) during node windows / encode alone",
        "overhead_pct_of_encode_time": round(r["overhead_pct_of_encode_time"], 1),
        "target_overhead_pct": 100 * TARGET_OVERHEAD, "target_met": r["target_met"],
        "encode_thread_sets_per_s": round(r["encode_thread_sets_per_s"], 3),
        "model_ms_per_batch": {"node": round(r["model_ms_per_batch_node"], 1),
                               "alone_main": round(r["encode_ms_per_batch_main"], 1),
                               "alone_thread": round(r["encode_ms_per_batch_thread"], 1)},
        "latency_ms_saturation": {k: round(v, 1) for k, v in r["latency_ms_saturation"].items()},
        "latency_ms_1hz": {k: round(v, 1) for k, v in light["latency_ms"].items()},
        "added_latency_ms_1hz": {k: round(v, 1) for k, v in light["added_ms"].items()},
        "encode_ms_one_set": round(r["encode_ms_one_set"], 1),
        "node_work_cpu_ms_per_set": {k: round(v, 2) for k, v in r["node_work_cpu_ms_per_set"].items()},
        "encode_cpu_ms_per_set": round(r["encode_alone"]["main"]["cpu_ms_per_set"], 1),
        "camera_process_cpu_ms_per_set": round(statistics.median(
            [s["camera_process_cpu_ms_per_set"] for s in r["segments"]]), 1),
        "torch_threads": r["torch_threads"], "load_avg_1min": [round(v, 2) for v in r["load_avg_1min"]],
        "transport": r["transport"],
    }


def _latency_row(r: dict) -> dict:
    """Light load (1 Hz, a batch of one): stamp -> publish latency of the node against the time
    `encode` takes for one set alone; the difference is what the node adds."""
    light = r["light"]
    return {
        "params": {"cameras": CAMERAS, "size": f"{SIZE}x{SIZE}", "encoding": "rgb8", "rate_hz": light["rate_hz"],
                   "sets": light["sets"], "model": "small", "malloc": r["malloc"], "metric": "latency p50",
                   "reference": "BatchedQwenVL.encode of one set alone"},
        "ours": light["latency_ms"]["p50"], "reference": r["encode_ms_one_set"], "unit": "ms", "lower_is_better": True,
        "error": "encode within 1e-4 (test_node)",
        "added_latency_ms": {k: round(v, 1) for k, v in light["added_ms"].items()},
        "latency_ms": {k: round(v, 1) for k, v in light["latency_ms"].items()},
        "outside_model_ms": {k: round(v, 1) for k, v in light["outside_model_ms"].items()},
        "frame_arrival_ms": {k: round(v, 1) for k, v in light["frame_arrival_ms"].items()},
    }


def run(quick: bool = False) -> list[dict]:
    """Rows for bench/run.py, per malloc mode: node sets/s at saturation ("ours") against encode
    alone ("reference"), and stamp -> publish latency at 1 Hz against encode of one set alone.
    Quick: the tuned glibc malloc mode (what qvl_node sets); full: also glibc's defaults. Each mode
    runs in a fresh process."""
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    modes = ["tuned"] if quick else ["tuned", "default"]  # tuned: what qvl_node's entry point runs with
    rows = []
    for m in modes:
        r = _child(quick, m, threads, 150 if quick else 300)
        rows += [_row(r), _latency_row(r)]
    return rows


def _f(x, nd=1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def report(results: list[dict]) -> str:
    r0 = results[0]
    lines = [f"qvl_node vs BatchedQwenVL.encode alone — device cpu ({r0['torch_threads']} torch threads, "
             f"{r0['cores']} cores), float32, torch {r0['torch']}, {r0['rmw']}",
             f"model: small benchmark config (docs/architecture.md), random weights; {CAMERAS} cameras {SIZE}x{SIZE} rgb8 "
             f"from a separate process, reliable QoS, {r0['transport']}; batch.max_size {BATCH}, "
             f"batch.queue_depth {QUEUE_DEPTH}; "
             f"cameras at {OVERLOAD}x the encode-alone rate; encode alone timed between node windows", "",
             "| malloc | encode sets/s (main thr) | encode sets/s (other thr) | node sets/s | ratio | overhead "
             "(target <= 10%) | model ms/batch: node / alone main / alone other thr | latency p50/p95 ms saturated "
             "| latency p50/p95 ms 1 Hz | added p50/p95 ms 1 Hz | encode 1 set ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        light = r["light"]
        lines.append(
            f"| {r['malloc']} | {_f(r['encode_sets_per_s'], 2)} | {_f(r['encode_thread_sets_per_s'], 2)} "
            f"| {_f(r['node_sets_per_s'], 2)} | **{r['ratio']:.1%}** "
            f"| {'' if r['target_met'] else 'MISSED '}{r['overhead_pct_of_encode_time']:.1f}% "
            f"| {_f(r['model_ms_per_batch_node'], 0)} / {_f(r['encode_ms_per_batch_main'], 0)} / "
            f"{_f(r['encode_ms_per_batch_thread'], 0)} "
            f"| {_f(r['latency_ms_saturation']['p50'], 0)} / {_f(r['latency_ms_saturation']['p95'], 0)} "
            f"| {_f(light['latency_ms']['p50'], 0)} / {_f(light['latency_ms']['p95'], 0)} "
            f"| {_f(light['added_ms']['p50'], 0)} / {_f(light['added_ms']['p95'], 0)} "
            f"| {_f(r['encode_ms_one_set'], 0)} |")
    lines += ["", "The node's own work per published set at saturation, CPU ms (median over windows):", "",
              "| malloc | callbacks (convert + sync + queue) | executor thread in all (take, deserialize, callbacks) "
              "| messages + publish | DDS threads | node work total | % of encode CPU/set | camera process |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        w = r["node_work_cpu_ms_per_set"]
        enc_cpu = r["encode_alone"]["main"]["cpu_ms_per_set"]
        cam = statistics.median([s["camera_process_cpu_ms_per_set"] for s in r["segments"]])
        lines.append(f"| {r['malloc']} | {_f(w['callbacks'], 2)} | {_f(w['executor_thread'], 2)} "
                     f"| {_f(w['messages_and_publish'], 2)} | {_f(w['dds_threads'], 2)} | {_f(w['total'], 1)} "
                     f"| {_f(100 * w['total'] / enc_cpu, 1)}% | {_f(cam, 1)} |")
    lines += ["", "The model's threads (calling thread + torch pool) per set, ms: wall, CPU, waiting for a core "
              "(runnable, another process or thread had it), asleep = threads x wall - CPU - waiting (blocked: "
              "GIL, pool barriers, serial Python between operators); process system CPU and minor page faults:", "",
              "| malloc | model call | wall | CPU | waiting for a core | asleep | system CPU | minor faults |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ea = r["encode_alone"]
        n_thr = r["torch_threads"]
        segs = r["segments"]
        med = lambda f: statistics.median([f(s) for s in segs])  # noqa: E731
        for label, which in (("alone, main thread", "main"), ("alone, other thread", "thread")):
            e = ea[which]
            wall = r[f"encode_ms_per_batch_{which}"] / BATCH
            lines.append(f"| {r['malloc']} | {label} | {_f(wall, 0)} | {_f(e['cpu_ms_per_set'], 0)} "
                         f"| {_f(e['runqueue_wait_ms_per_set'], 1)} "
                         f"| {_f(n_thr * wall - e['cpu_ms_per_set'] - e['runqueue_wait_ms_per_set'], 0)} "
                         f"| {_f(e['sys_ms_per_set'], 0)} | {_f(e['minor_faults_per_set'], 0)} |")
        wall = med(lambda s: s["model_wall_ms_per_set"])
        cpu = med(lambda s: s["model_cpu_ms_per_set"])
        wait = med(lambda s: s["model_runqueue_wait_ms_per_set"])
        lines.append(f"| {r['malloc']} | in the node (batch worker) | {_f(wall, 0)} | {_f(cpu, 0)} | {_f(wait, 1)} "
                     f"| {_f(n_thr * wall - cpu - wait, 0)} | {_f(med(lambda s: s['process_sys_ms_per_set']), 0)} "
                     f"| {_f(med(lambda s: s['minor_faults_per_set']), 0)} |")
    lines += ["", "Windows:", ""]
    for r in results:
        for i, s in enumerate(r["segments"]):
            lines.append(f"- {r['malloc']} #{i}: {s['window_s']:.1f} s, {s['sets']} sets in {s['batches']} batches "
                         f"(mean {s['batch_size_mean']:.2f}), {s['sets_per_s']:.2f} sets/s, {s['received_by_counter']} "
                         f"received by the counter, {s['frames_received']} frames in, {s['queue_full_drops']} sets "
                         f"dropped (queue full), receive latency p50 {_f(s['receive_latency_ms']['p50'], 0)} ms, "
                         f"machine busy {s['machine_busy_cores']:.2f} cores (other processes {s['other_processes_cores']:.2f}), "
                         f"per batch {s['cycle_ms_per_batch']:.0f} ms of which model {s['model_ms_per_batch']:.0f} ms")
        light = r["light"]
        lines.append(f"- {r['malloc']} 1 Hz: {light['sets']} sets, batch sizes {sorted(set(light['batch_sizes']))}, "
                     f"model in the node p50 {_f(light['model_ms_in_node']['p50'], 0)} ms, latency outside the model "
                     f"p50/p95 {_f(light['outside_model_ms']['p50'], 1)} / {_f(light['outside_model_ms']['p95'], 1)} ms, "
                     f"of which frame arrival (stamp -> camera callback, incl. rendering in the camera process) "
                     f"p50/p95 {_f(light['frame_arrival_ms']['p50'], 1)} / {_f(light['frame_arrival_ms']['p95'], 1)} ms; "
                     f"camera callback {_f(light['callback_ms_per_frame'], 2)} ms per frame")
        ea = r["encode_alone"]
        lines.append(f"- {r['malloc']}: encode ms per call, main {ea['main']['ms_per_call']}, other thread "
                     f"{ea['thread']['ms_per_call']}, one set {ea['single']['ms_per_call']}; cameras at "
                     f"{r['camera_rate_hz']} Hz; malloc: {r['malloc_settings']}; 1-min load average "
                     f"{[round(v, 2) for v in r['load_avg_1min']]}; {r['elapsed_s']:.0f} s")
    lines += ["", f"overhead = encode-alone sets/s / node sets/s - 1: the time per set the node adds to encode's "
              f"(target <= {TARGET_OVERHEAD:.0%}). The 1-min load average counts this benchmark's own threads too "
              f"(about {r0['torch_threads']} while saturated); 'other processes' in the windows is the CPU other "
              "programs took from the measurement."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one window of ~9 s (else two of ~20 s)")
    ap.add_argument("--malloc", nargs="+", choices=MALLOC_MODES, default=None,
                    help="malloc modes, one process each (default: tuned with --quick, else tuned and default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--transport", choices=TRANSPORTS, default="shm",
                    help="shm: Fast DDS shared memory with segments large enough for a frame (default); "
                         "default: Fast DDS's stock transports")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        # one measurement in this process; SIGTERM unwinds through the clean-up
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        mode = args.malloc[0]
        apply_malloc(mode)
        result = measure(args.quick, mode, args.threads, args.transport)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    modes = args.malloc or (["tuned"] if args.quick else ["tuned", "default"])
    print(f"1-min load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)", flush=True)
    results = []
    for m in modes:
        results.append(_child(args.quick, m, args.threads, 150 if args.quick else 240, args.transport))
        print(f"  {m}: node {results[-1]['node_sets_per_s']:.2f} sets/s, encode alone "
              f"{results[-1]['encode_sets_per_s']:.2f} sets/s ({results[-1]['elapsed_s']:.0f} s)", flush=True)
    print()
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
