"""Hostile input to the node's pipeline: bounded drop-reason keys and log lines, counted input
loss, logged synchronizer resets, and max_input_pixels.

The core parts run with injected clocks (no sleeps); the node parts over real DDS (rclpy in
this process, localhost, a random domain), with a tiny model, reading /diagnostics and /rosout.
"""
import random
import threading
import time
import types

import pytest
from polling import wait_for

from qvl_ros.core.conversion import ERROR_KEYS, ConversionError, msg_to_tensor
from qvl_ros.core.diagnostics import DROP_REASON_KEYS, LogThrottle, PipelineMonitor, reason_key
from qvl_ros.core.input_loss import InputLossEstimator
from qvl_ros.core.synchronizer import Synchronizer

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _garbage_encoding(rng):
    letters = "AbCdEfGhIjKlMnOpQrStUvWxYz:'\"0123456789 "
    return "".join(rng.choice(letters) for _ in range(rng.randint(1, 24))) + rng.choice([":", "'", '"', ""])


# ------------------------------------------------------------------------------------- core
def test_conversion_error_keys_are_drop_reason_keys():
    assert set(ERROR_KEYS) <= set(DROP_REASON_KEYS)


def test_a_flood_of_distinct_bad_encodings_keeps_keys_and_log_lines_bounded():
    """60 s at 200 msg/s of frames whose encodings are all different (the 'AbCdEfGhIj:' case),
    through the real conversion, the monitor and the node's throttle, on an injected clock."""
    clock = FakeClock()
    monitor = PipelineMonitor(["cam"], ["/cam/image_raw"], clock=clock)
    throttle = LogThrottle(5.0, clock=clock)
    rng = random.Random(0)
    lines, value_counts = [], []
    for i in range(12_000):
        msg = types.SimpleNamespace(height=4, width=4, encoding=_garbage_encoding(rng), is_bigendian=0,
                                    step=12, data=bytes(48))
        with pytest.raises(ConversionError) as err:
            msg_to_tensor(msg)
        monitor.frame_invalid(0, err.value)
        if throttle.check((0, reason_key(err.value))) is not None:
            lines.append(str(err.value))
        clock.t += 0.005
        if i % 2000 == 1999:
            statuses = monitor.statuses("/qvl_node")
            value_counts.append(sum(len(s[3]) for s in statuses))
            assert all(len(v) <= 300 for s in statuses for _, v in s[3])
    snap = monitor.snapshot()["cameras"][0]
    assert snap["invalid"] == 12_000
    assert snap["invalid_by_reason"] == {"unsupported_encoding": 12_000}
    assert len(lines) == 12  # one per 5 s over 60 s
    assert len(set(value_counts)) == 1  # /diagnostics does not grow
    assert len(throttle._last) == 1


def test_throttle_allows_one_line_per_key_and_period_and_forgets_old_keys():
    clock = FakeClock()
    th = LogThrottle(5.0, clock=clock, max_keys=4)
    assert th.check("a") == 0 and th.check("a") is None and th.check("b") == 0
    clock.t += 4.9
    assert th.check("a") is None
    clock.t += 0.2
    assert th.check("a") == 2  # logged again, with the count suppressed meanwhile
    for k in range(10):
        th.check(("k", k))
    assert len(th._last) == 4


def test_reason_keys_of_text_reasons():
    assert reason_key("cannot decode png: CRC error in chunk IDAT at byte 33") == "corrupt"
    assert reason_key("cannot decode jpeg: Unsupported marker type 0x12") == "decode_failed"
    assert reason_key("image too large: 20000x20000 = 400000000 pixels") == "too_large"
    assert reason_key("aspect ratio of 6000x28 exceeds 200") == "aspect_ratio"
    assert reason_key(RuntimeError("anything")) == "other"


def test_input_loss_from_stamp_gaps_and_middleware_events():
    est = InputLossEstimator(["a", "b"])
    period = 33_333_333
    t = 1_000_000_000_000
    missing = {20, 21, 22, 50, 80}
    for i in range(120):
        if i not in missing:
            est.frame(0, t + i * period + (i % 3) * 1_000_000)  # 1 ms jitter
        est.frame(1, t + i * period)
    est.frame(0, t + 400 * period)  # a 9 s pause: not loss
    est.frame(0, 0)  # no stamp: not counted
    est.middleware_lost(1, 3)
    a, b = est.snapshot()
    assert a["gap_lost"] == len(missing) and a["pauses"] == 1 and a["received"] == 117
    assert a["lost"] == 5 and a["loss_ratio"] == pytest.approx(5 / 122)
    assert b["gap_lost"] == 0 and b["rmw_lost"] == 3 and b["lost"] == 3
    assert a["period_s"] == pytest.approx(period * 1e-9, rel=0.05)
    late = InputLossEstimator(["c"])  # frames late by 0.6 period, then on time: nothing lost
    for i in range(100):
        late.frame(0, t + i * period + (int(0.6 * period) if i % 10 == 5 else 0))
    assert late.snapshot()[0]["gap_lost"] == 0
    level, name, message, values = est.status("/n")
    assert level == 1 and "a 5 (4.1%)" in message and dict(values)["a.gap_lost"] == "5"
    assert est.status("/n")[0] == 0  # nothing new since


def test_synchronizer_reports_the_cause_of_a_reset():
    sync = Synchronizer(2, 10_000_000, 10, reset_threshold=1_000_000_000)
    base = 1_700_000_000_000_000_000
    sync.add(0, base, "a")
    sync.add(1, base + 1000, "b")
    sync.add(0, base + 5 * 10**18 // 10**9, "future")  # far future
    assert sync.resets == 0
    sync.add(0, base + 33_000_000, "c")  # back from the future
    assert sync.resets == 1
    assert sync.stats()["last_reset"] == {"input": 0, "from_ns": base + 5_000_000_000, "to_ns": base + 33_000_000}
    sync.add(1, base + 34_000_000, "d")
    sync.add(1, 0, "zero stamp")
    assert sync.resets == 2 and sync.stats()["last_reset"]["input"] == 1
    sync.reset()
    assert sync.stats()["last_reset"] == {"input": None, "from_ns": None, "to_ns": None}


# ------------------------------------------------------------------------------------- node
rclpy = pytest.importorskip("rclpy")
pytest.importorskip("qvl_ros.msg")


@pytest.fixture(scope="module")
def model(tiny_path):
    from qvl_ros.model import BatchedQwenVL

    return BatchedQwenVL.from_pretrained(tiny_path, device="cpu", dtype="float32")


def _wait(pred, timeout=10.0):
    return wait_for(pred, timeout)


class Harness:
    """qvl_node with one raw camera topic, a reliable publisher and /diagnostics + /rosout readers."""

    def __init__(self, ros, model, ns, params=()):
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.msg import Log
        from rclpy.node import Node
        from rclpy.parameter import Parameter
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from qvl_ros.ros.node import QvlNode

        self.context, self.executor = ros
        self.node = QvlNode(model=model, context=self.context, namespace=ns, parameter_overrides=[
            Parameter("camera_topics", value=["cam/image_raw"]), Parameter("diagnostics.period", value=0.2),
            Parameter("qos.reliability", value="reliable"), Parameter("qos.depth", value=1000),
            *[Parameter(k, value=v) for k, v in params]])
        self.peer = Node("peer", context=self.context, namespace=ns)
        self.lock = threading.Lock()
        self.diags, self.logs = [], []
        self.peer.create_subscription(DiagnosticArray, "/diagnostics", self._keep(self.diags), 50)
        self.peer.create_subscription(Log, "/rosout", self._keep(self.logs), QoSProfile(depth=1000))
        self.pub = self.peer.create_publisher(Image, "cam/image_raw",
                                              QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE))
        for n in (self.node, self.peer):
            self.executor.add_node(n)
        self.fqn = self.node.get_fully_qualified_name()
        assert _wait(lambda: self.pub.get_subscription_count() >= 1)
        assert _wait(lambda: "qvl_node" in {i.node_name for i in self.peer.get_publishers_info_by_topic("/rosout")})
        time.sleep(0.3)

    def _keep(self, store):
        def cb(msg):
            with self.lock:
                store.append(msg)
        return cb

    def image(self, stamp_ns, h=32, w=32, encoding="rgb8", data=None):
        from sensor_msgs.msg import Image

        m = Image()
        m.header.stamp.sec, m.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
        m.height, m.width, m.encoding, m.step = h, w, encoding, w * 3
        m.data = data if data is not None else bytes(h * w * 3)
        return m

    def received(self):
        return self.node.pipeline_stats()["monitor"]["cameras"][0]["received"]

    def errors(self, words):
        logger = self.fqn.strip("/").replace("/", ".")
        with self.lock:
            return [m.msg for m in self.logs if m.name == logger and words in m.msg]

    def latest(self, suffix):
        with self.lock:
            for arr in reversed(self.diags):
                for s in arr.status:
                    if s.name == f"{self.fqn}: {suffix}":
                        return s.message, {kv.key: kv.value for kv in s.values}
        return None

    def close(self):
        for n in (self.node, self.peer):
            self.executor.remove_node(n)
            n.destroy_node()


@pytest.fixture
def harness(ros, model):
    made = []

    def make(ns, params=()):
        made.append(Harness(ros, model, f"/{ns}_{random.randrange(1 << 30)}", params))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_node_flood_of_bad_encodings_keeps_diagnostics_and_logs_bounded(harness):
    h = harness("flood", params=[("log_throttle", 5.0)])
    rng = random.Random(1)
    n = 400
    t0 = time.monotonic()
    for i in range(n):
        h.pub.publish(h.image(1_700_000_000_000_000_000 + i * 5_000_000, encoding=_garbage_encoding(rng)))
        if i % 50 == 49:
            time.sleep(0.05)
    assert _wait(lambda: h.received() >= n, 30)
    elapsed = time.monotonic() - t0
    cam = h.node.pipeline_stats()["monitor"]["cameras"][0]
    assert cam["invalid"] == n and cam["invalid_by_reason"] == {"unsupported_encoding": n}
    assert _wait(lambda: h.latest("camera cam") and h.latest("camera cam")[1].get("invalid") == str(n), 5)
    _, values = h.latest("camera cam")
    assert [k for k in values if k.startswith("invalid.")] == ["invalid.unsupported_encoding"]
    lines = h.errors("dropped a frame")
    assert 1 <= len(lines) <= int(elapsed // 5.0) + 1, (elapsed, lines)
    assert "unsupported_encoding" in lines[0]


def test_node_drops_frames_over_max_input_pixels_and_counts_loss_and_resets(harness):
    h = harness("limits", params=[("max_input_pixels", 40 * 40), ("log_throttle", 30.0)])
    period = 33_333_333
    base = 1_700_000_000_000_000_000
    sent = 0
    for i in range(60):
        if i in (30, 31, 32, 45):  # frames the camera "sent" that never arrive
            continue
        h.pub.publish(h.image(base + i * period))
        sent += 1
    h.pub.publish(h.image(base + 60 * period, h=48, w=48, data=bytes(8)))  # declares 2304 px, over the limit
    h.pub.publish(h.image(base + 10**15))  # far future stamp ...
    h.pub.publish(h.image(base + 61 * period))  # ... and back: a reset
    assert _wait(lambda: h.received() >= sent + 3, 20)
    cam = h.node.pipeline_stats()["monitor"]["cameras"][0]
    assert cam["invalid_by_reason"] == {"too_large": 1}
    assert _wait(lambda: any("too_large" in e and "max_input_pixels 1600" in e
                             for e in h.errors("dropped a frame")), 5)
    assert _wait(lambda: h.errors("synchronizer reset"), 5)
    reset = h.errors("synchronizer reset")[0]
    assert "camera cam stamp went back from 1701000000.0" in reset and "to 1700000002.033" in reset
    assert _wait(lambda: (h.latest("input loss") or ("", {}))[1].get("cam.gap_lost") == "4", 5)
    message, values = h.latest("input loss")
    assert values["cam.lost"] == "4" and values["cam.rmw_lost"] in ("0", "unsupported")
    assert "cam 4" in message
