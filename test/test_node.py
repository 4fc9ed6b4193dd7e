"""qvl_node over real DDS (rclpy in this process, localhost discovery, a random domain id).

One context and one executor serve the module; every test runs in its own
namespace. Cameras are `qvl_ros.sim.synthetic.SyntheticCameras` driven tick by tick from the test
thread, which records every message it publishes. The oracle is a second `BatchedQwenVL`
loaded from the same tiny checkpoint: `encode` / `encode_generate` on the frames of each set
(converted from the recorded messages), compared with what the node published.
"""
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from polling import wait_for

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("qvl_ros.msg")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from qvl_ros.core.conversion import msg_to_tensor  # noqa: E402
from qvl_ros.ros.feature_msgs import stamp_ns, time_msg  # noqa: E402
from qvl_ros.model import BatchedQwenVL  # noqa: E402
from qvl_ros.msg import Caption, VisionFeatures  # noqa: E402
from qvl_ros.ros.node import QvlNode, default_camera_names  # noqa: E402
from qvl_ros.sim.synthetic import SyntheticCameras  # noqa: E402
from qvl_ros.ros.tensor_msg import features_to_numpy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
PROMPT = "Describe the scene."
_ns_counter = itertools.count()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(tiny_path):
    return BatchedQwenVL.from_pretrained(tiny_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def oracle(tiny_path):
    """An independent instance for the expected outputs."""
    return BatchedQwenVL.from_pretrained(tiny_path, device="cpu", dtype="float32")


class Collector(Node):
    """Records features, captions, /diagnostics and /rosout; can publish /clock and raw frames."""

    def __init__(self, context, namespace, outputs=True):
        super().__init__("collector", context=context, namespace=namespace)
        self.lock = threading.Lock()
        self.features, self.captions, self.diagnostics, self.logs = [], [], [], []
        if outputs:  # lazy tests subscribe to the outputs themselves
            self.create_subscription(VisionFeatures, "features", self._keep(self.features, latency=True), 200)
            self.create_subscription(Caption, "caption", self._keep(self.captions), 200)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._keep(self.diagnostics), 200)
        self.create_subscription(Log, "/rosout", self._keep(self.logs), QoSProfile(depth=1000))
        self.clock_pub = self.create_publisher(Clock, "/clock", 10)

    def _keep(self, store, latency=False):
        def callback(msg):
            with self.lock:
                if latency:
                    store.append((msg, (self.get_clock().now().nanoseconds - stamp_ns(msg.header.stamp)) * 1e-9))
                else:
                    store.append(msg)
        return callback

    def got(self, store):
        with self.lock:
            return list(store)

    def feature_msgs(self):
        return [m for m, _ in self.got(self.features)]

    def node_logs(self, level, node_fqn):
        logger = node_fqn.strip("/").replace("/", ".")
        return [m.msg for m in self.got(self.logs) if m.level == level and m.name == logger]

    def pipeline_status(self, node_fqn):
        """Latest summary and camera statuses of the node, as {name: (level, message, {k: v})}."""
        for arr in reversed(self.got(self.diagnostics)):
            out = {s.name: (s.level[0] if isinstance(s.level, bytes) else s.level, s.message,
                            {kv.key: kv.value for kv in s.values}) for s in arr.status}
            if f"{node_fqn}: pipeline" in out:
                return out
        return None


class Recorder:
    """Keeps every message the synthetic cameras publish, by camera and stamp."""

    def __init__(self, n, keep=True):
        self.lock = threading.Lock()
        self.keep = keep
        self.by_stamp = [dict() for _ in range(n)]
        self.count = 0

    def __call__(self, index, msg):
        with self.lock:
            self.by_stamp[index][stamp_ns(msg.header.stamp)] = msg if self.keep else None
            self.count += 1

    def frames(self, stamps):
        with self.lock:
            return [msg_to_tensor(self.by_stamp[k][s]) for k, s in enumerate(stamps)]


class Rig:
    """Node under test + synthetic cameras + collector in a namespace of their own."""

    def __init__(self, ros, model, *, topics, encodings=("rgb8",), sizes=("224x168",), jitter_ms=5.0,
                 node_params=(), camera_params=(), node_model=None, keep_frames=True, node_class=QvlNode,
                 outputs=True):
        self.context, self.executor = ros
        self.ns = f"/t{next(_ns_counter)}_{os.getpid()}"
        self.nodes = []
        self.recorder = Recorder(len(topics), keep=keep_frames)
        self.node = node_class(model=node_model or model, context=self.context, namespace=self.ns,
                               parameter_overrides=[Parameter("camera_topics", value=list(topics)),
                                                    Parameter("prompt", value=PROMPT),
                                                    *[Parameter(k, value=v) for k, v in node_params]])
        self.cameras = SyntheticCameras(context=self.context, namespace=self.ns, on_publish=self.recorder,
                                        parameter_overrides=[
                                            Parameter("topics", value=list(topics)),
                                            Parameter("encodings", value=list(encodings)),
                                            Parameter("sizes", value=list(sizes)),
                                            Parameter("rate", value=0.0),
                                            Parameter("jitter_ms", value=float(jitter_ms)),
                                            *[Parameter(k, value=v) for k, v in camera_params]])
        self.collector = Collector(self.context, self.ns, outputs=outputs)
        for n in (self.node, self.cameras, self.collector):
            self.executor.add_node(n)
            self.nodes.append(n)
        self.fqn = self.node.get_fully_qualified_name()
        if node_class is QvlNode and outputs:
            self.wait_connected()

    def camera_publishers(self):
        return [p for p in self.cameras.publishers if p.topic_name in self.cameras.resolved_topics]

    def wait_connected(self):
        """Until every camera publisher and the features publisher are matched with their
        subscribers (matched endpoints, not just the graph) and the node logs to /rosout."""
        c = self.collector
        assert wait_for(lambda: all(p.get_subscription_count() >= 1 for p in self.camera_publishers()), 20)
        assert wait_for(lambda: self.node._features_pub.get_subscription_count() >= 1, 20)
        logger_nodes = lambda: {i.node_name for i in c.get_publishers_info_by_topic("/rosout")}  # noqa: E731
        assert wait_for(lambda: "qvl_node" in logger_nodes(), 20)

    def drive(self, ticks, period=0.1, each=None):
        """Publish `ticks` ticks at a steady period; `each(i)` runs before tick i."""
        t_next = time.monotonic()
        for i in range(ticks):
            if each is not None:
                each(i)
            self.cameras.publish_tick()
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))

    def settle(self, timeout=30.0, loss_grace=3.0):
        """Wait until every frame the cameras published has reached the node (or, should best
        effort have lost one, until nothing arrived for `loss_grace` s), the batcher is idle and
        the collector has every features message the node published."""
        end = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < end:
            s = self.node.pipeline_stats()
            # frames through the synchronizer (counted after the callback converted and added
            # them) plus the invalid ones: every frame whose callback has finished
            received = sum(s["sync"]["received"]) + sum(c["invalid"] for c in s["monitor"]["cameras"])
            if received != last:
                last, since = received, time.monotonic()
            with self.recorder.lock:
                all_in = received >= self.recorder.count
            idle = s["batch"]["depth"] == 0 and s["batch"]["running"] == 0
            have = len(self.collector.got(self.collector.features)) >= s["monitor"]["published"]
            if idle and have and (all_in or time.monotonic() - since >= loss_grace):
                return
            time.sleep(0.02)
        raise AssertionError(f"pipeline did not settle: {self.node.pipeline_stats()}")

    def close(self):
        for n in self.nodes:
            self.executor.remove_node(n)
            n.destroy_node()


@pytest.fixture
def rigs(ros, model):
    made = []

    def make(**kwargs):
        rig = Rig(ros, model, **kwargs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


# ----------------------------------------------------------------------------- oracle
def assert_matches_oracle(oracle, rig, msg, kinds=("vision", "hidden"), caption=None, max_new_tokens=None):
    stamps = [stamp_ns(s) for s in msg.camera_stamps]
    frames = rig.recorder.frames(stamps)
    if caption is None:
        ref = oracle.encode([frames], [msg.prompt])
    else:
        ref, texts = oracle.encode_generate([frames], [msg.prompt], max_new_tokens=max_new_tokens)
        assert caption.text == texts[0].replace("\x00", "")  # ROS strings cannot hold NUL
    arrays = features_to_numpy(msg)
    expected_names = [f"vision/{n}" for n in rig.node.camera_names] * ("vision" in kinds)
    expected_names += ["hidden"] * ("hidden" in kinds)
    assert [t.name for t in msg.tensors] == expected_names
    for k, name in enumerate(rig.node.camera_names):
        if "vision" in kinds:
            np.testing.assert_allclose(arrays[f"vision/{name}"], ref.vision[0][k].numpy(), rtol=1e-4, atol=1e-4)
    if "hidden" in kinds:
        n_real = int(ref.attention_mask[0].sum())
        want = ref.hidden[0, ref.hidden.shape[1] - n_real:].numpy()
        np.testing.assert_allclose(arrays["hidden"], want, rtol=1e-4, atol=1e-4)


def check_stamps(rig, msgs, ticks_expected):
    """Each message is one tick's frames (one per camera), every set once, in order."""
    seen = set()
    last = None
    for m in msgs:
        stamps = tuple(stamp_ns(s) for s in m.camera_stamps)
        assert list(m.camera_names) == rig.node.camera_names
        assert stamp_ns(m.header.stamp) == max(stamps)
        assert stamps not in seen
        seen.add(stamps)
        with rig.recorder.lock:
            assert all(s in rig.recorder.by_stamp[k] for k, s in enumerate(stamps))
        # Within slop (30 ms, below the 100 ms period): all frames of a set come from one tick.
        assert max(stamps) - min(stamps) <= rig.node.slop_ns
        if last is not None:
            assert all(a < b for a, b in zip(last, stamps))
        last = stamps
    assert len(msgs) >= ticks_expected


def test_default_camera_names():
    assert default_camera_names(["/robot/front/image_raw/compressed", "left/image_rect", "cam"]) == \
        ["front", "left", "cam"]
    assert default_camera_names(["a/x/image_raw", "b/x/image_raw"]) == ["a_x", "b_x"]
    assert default_camera_names(["x", "x"]) == ["x_0", "x_1"]


# ----------------------------------------------------------------------------- tests
def test_every_set_yields_one_features_message_equal_to_encode(rigs, oracle):
    """3 cameras at 10 Hz with +-5 ms jitter: one features message per synchronized set, with
    the cameras' stamps, whose tensors equal BatchedQwenVL.encode on the same frames."""
    rig = rigs(topics=["cam_a/image_raw", "cam_b/image_raw", "cam_c/image_raw"],
               sizes=["224x168", "280x210", "196x196"],
               node_params=[("diagnostics.period", 0.25), ("diagnostics.stale_after", 30.0),
                            ("diagnostics.no_set_after", 30.0)])
    # sync.slop left at its default and no expected rates: a third of a 10 Hz frame period
    assert rig.node.slop_ns == 33_333_333
    ticks = 30
    rig.drive(ticks)
    rig.settle()
    stats = rig.node.pipeline_stats()
    msgs = rig.collector.feature_msgs()
    # Exactly one message per synchronized set, none lost or duplicated.
    assert stats["sync"]["sets"] == stats["batch"]["put"] == stats["monitor"]["published"] == len(msgs), stats
    assert stats["batch"]["drops"] == {"queue_full": 0, "error": 0, "shutdown": 0, "time_reset": 0, "inactive": 0}
    assert stats["monitor"]["model_errors"] == 0
    check_stamps(rig, msgs, ticks_expected=ticks - 3)  # best effort: a lost frame costs a set
    for m in msgs:
        assert m.model == rig.node.model.name and m.prompt == PROMPT
        assert_matches_oracle(oracle, rig, m)
    # Header stamps are the cameras' own: the newest of the set, copied bit for bit.
    with rig.recorder.lock:
        published = [set(d) for d in rig.recorder.by_stamp]
    assert all(stamp_ns(s) in published[k] for m in msgs for k, s in enumerate(m.camera_stamps))
    # Diagnostics: per-camera input rate about 10 Hz, sets/s, latency, queue depth, no stale camera.
    status = rig.collector.pipeline_status(rig.fqn)
    assert status is not None
    level, message, values = status[f"{rig.fqn}: pipeline"]
    for key in ("sets_per_s", "latency_p50_ms", "latency_p95_ms", "queue_depth", "drops.sync.unmatched",
                "drops.batch.queue_full", "drops.invalid_frame", "stale_cameras"):
        assert key in values, key
    assert values["stale_cameras"] == "" and level == 0
    assert wait_for(lambda: int(rig.collector.pipeline_status(rig.fqn)[f"{rig.fqn}: pipeline"][2]["sets_published"])
                    == len(msgs))
    for k, name in enumerate(rig.node.camera_names):
        c_level, _, c_values = rig.collector.pipeline_status(rig.fqn)[f"{rig.fqn}: camera {name}"]
        assert int(c_values["received"]) == stats["monitor"]["cameras"][k]["received"] >= ticks - 3
        assert c_values["stale"] == "false" and c_level == 0


def test_captions_mixed_encodings_compressed_camera_and_resolution_change(rigs, oracle):
    """bgr8 + yuv422 + JPEG on a /compressed topic, captions on; camera 0 switches from 224x168
    to 308x224 mid-stream, which is no error: the new size is used from that frame on."""
    rig = rigs(topics=["front/image_raw", "left/image_raw", "rear/image_raw/compressed"],
               encodings=["bgr8", "yuv422", "jpeg"], sizes=["224x168", "252x196", "196x140"],
               node_params=[("caption.enabled", True), ("caption.max_new_tokens", 5)])
    assert [s.msg_type for s in rig.node._subs] == [Image, Image, CompressedImage]
    switch = 8
    rig.drive(18, each=lambda i: rig.cameras.set_size(0, 308, 224) if i == switch else None)
    rig.settle()
    assert wait_for(lambda: len(rig.collector.got(rig.collector.captions)) >= len(rig.collector.feature_msgs()))
    msgs = rig.collector.feature_msgs()
    captions = {tuple(stamp_ns(s) for s in c.camera_stamps): c for c in rig.collector.got(rig.collector.captions)}
    assert len(captions) == len(msgs) == rig.node.pipeline_stats()["sync"]["sets"]
    check_stamps(rig, msgs, ticks_expected=15)
    sizes = set()
    for m in msgs:
        key = tuple(stamp_ns(s) for s in m.camera_stamps)
        cap = captions[key]
        assert cap.header.stamp == m.header.stamp and list(cap.camera_names) == list(m.camera_names)
        assert cap.prompt == PROMPT and cap.model == m.model
        assert_matches_oracle(oracle, rig, m, caption=cap, max_new_tokens=5)
        sizes.add(tuple(features_to_numpy(m)["vision/front"].shape))
    assert len(sizes) == 2  # both resolutions of camera 0 were served
    assert rig.node.pipeline_stats()["monitor"]["cameras"][0]["invalid"] == 0


def test_stale_camera_is_reported_and_node_serves_again_when_it_returns(rigs):
    rig = rigs(topics=["s0/image_raw", "s1/image_raw", "s2/image_raw"],
               node_params=[("diagnostics.stale_after", 0.5), ("diagnostics.period", 0.2)])
    stale_name = rig.node.camera_names[2]
    rig.drive(10)
    rig.settle()
    before = len(rig.collector.feature_msgs())
    assert before >= 8
    t_off = rig.node.get_clock().now().nanoseconds
    rig.cameras.set_enabled(2, False)
    rig.drive(12)
    status = rig.collector.pipeline_status(rig.fqn)  # the last one, while cameras 0 and 1 published
    level, message, values = status[f"{rig.fqn}: pipeline"]
    assert values["stale_cameras"] == stale_name and level == 1 and stale_name in message
    c_level, c_message, c_values = status[f"{rig.fqn}: camera {stale_name}"]
    assert c_level == 1 and c_values["stale"] == "true" and "stale" in c_message
    assert status[f"{rig.fqn}: camera {rig.node.camera_names[0]}"][2]["stale"] == "false"
    assert any(stale_name in m and "stale" in m for m in rig.collector.node_logs(30, rig.fqn))
    rig.settle()
    # No set without camera 2: every set published holds one of its frames from before it went
    # quiet (approximate_time may release the last of them only once the others move on).
    msgs = rig.collector.feature_msgs()
    assert len(msgs) <= before + 1
    assert all(stamp_ns(m.camera_stamps[2]) < t_off for m in msgs)
    t_back = rig.node.get_clock().now().nanoseconds
    rig.cameras.set_enabled(2, True)
    rig.drive(10)
    # The last status came out while all cameras were publishing again.
    values = rig.collector.pipeline_status(rig.fqn)[f"{rig.fqn}: pipeline"][2]
    assert values["stale_cameras"] == ""
    rig.settle()
    msgs = rig.collector.feature_msgs()
    resumed = [m for m in msgs if stamp_ns(m.camera_stamps[2]) > t_back - 10_000_000]
    assert len(resumed) >= 8


def _image(h, w, encoding="rgb8", step=None, data_len=None, stamp=1):
    msg = Image()
    msg.header.stamp = time_msg(stamp)
    msg.height, msg.width, msg.encoding = h, w, encoding
    msg.step = w * 3 if step is None else step
    n = msg.step * h if data_len is None else data_len
    msg.data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    return msg


def test_bad_frames_are_logged_dropped_counted_and_the_node_keeps_serving(rigs):
    rig = rigs(topics=["raw/image_raw", "jpg/image_raw/compressed"], encodings=["rgb8", "jpeg"],
               node_params=[("log_throttle", 30.0)])
    c = rig.collector
    raw_topic, jpg_topic = rig.node.camera_topics
    qos = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
    raw_pub = c.create_publisher(Image, raw_topic, qos)
    jpg_pub = c.create_publisher(CompressedImage, jpg_topic, qos)
    assert wait_for(lambda: raw_pub.get_subscription_count() >= 1 and jpg_pub.get_subscription_count() >= 1)

    def jpeg(data):
        m = CompressedImage()
        m.format = "jpeg"
        m.data = data
        return m

    rng = np.random.default_rng(0)
    raw_bad = [  # (message, words the log must contain)
        (_image(48, 64, encoding="weird16"), "unsupported encoding"),
        (_image(48, 64, step=100), "step"),
        (_image(48, 64, data_len=100), "data has 100 bytes"),
        (_image(0, 0), "empty image"),
        (_image(1, 1), "too small"),
        (_image(20, 20), "too small"),  # same reason again: counted, log throttled
        (_image(28, 6000), "aspect ratio over 200"),  # converts, but the model cannot take it
    ]
    jpg_bad = [
        (jpeg(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes()), "cannot decode"),
        (jpeg(b""), "no data"),
        (jpeg(b"not an image at all"), "neither JPEG nor PNG"),
    ]

    def inject(i):
        if i < len(raw_bad):
            raw_pub.publish(raw_bad[i][0])
        if i < len(jpg_bad):
            jpg_pub.publish(jpg_bad[i][0])

    ticks = 15
    rig.drive(ticks, each=inject)
    rig.settle()
    stats = rig.node.pipeline_stats()
    cams = stats["monitor"]["cameras"]
    assert cams[0]["invalid"] == len(raw_bad) and cams[1]["invalid"] == len(jpg_bad)
    assert sum(cams[0]["invalid_by_reason"].values()) == len(raw_bad)
    assert cams[0]["invalid_by_reason"]["aspect_ratio"] == 1  # the key extraction counts it under
    # Good frames kept flowing: every tick became a set and a features message.
    msgs = rig.collector.feature_msgs()
    assert len(msgs) == stats["sync"]["sets"] >= ticks - 3
    assert stats["monitor"]["model_errors"] == 0
    assert wait_for(lambda: len(c.node_logs(40, rig.fqn)) >= len(raw_bad) - 1 + len(jpg_bad), 5)
    errors = c.node_logs(40, rig.fqn)
    for topic, cases in ((raw_topic, raw_bad), (jpg_topic, jpg_bad)):
        for _, words in cases:
            assert any(topic in e and words in e for e in errors), (topic, words, errors)
    # Throttled: one line for the two "too small" frames.
    assert sum("too small" in e for e in errors) == 1
    values = rig.collector.pipeline_status(rig.fqn)[f"{rig.fqn}: pipeline"][2]
    assert int(values["drops.invalid_frame"]) == len(raw_bad) + len(jpg_bad)


class FailingModel:
    """Wraps a model; raises on chosen calls (1-based) to show the node survives."""

    def __init__(self, model, fail_calls):
        self.model, self.fail_calls, self.calls = model, set(fail_calls), 0
        self.name, self.device = model.name, model.device

    def encode(self, images, prompts):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("synthetic failure in the model")
        return self.model.encode(images, prompts)


def test_model_exception_is_logged_with_stamps_and_the_node_keeps_running(rigs, model):
    failing = FailingModel(model, fail_calls={4})
    rig = rigs(topics=["m0/image_raw", "m1/image_raw"], node_model=failing,
               node_params=[("batch.max_size", 1)])
    rig.drive(12)
    rig.settle()
    stats = rig.node.pipeline_stats()
    msgs = rig.collector.feature_msgs()
    assert stats["monitor"]["model_errors"] == 1 and stats["batch"]["drops"]["error"] == 1
    assert len(msgs) == stats["sync"]["sets"] - 1 >= 9
    assert wait_for(lambda: any("model failed" in e for e in rig.collector.node_logs(40, rig.fqn)), 5)
    line = next(e for e in rig.collector.node_logs(40, rig.fqn) if "model failed" in e)
    assert "synthetic failure in the model" in line
    logged = [int(a) * 1_000_000_000 + int(b) for a, b in re.findall(r"(\d+)\.(\d{9})", line)]
    assert len(logged) == 2
    published_sets = {tuple(stamp_ns(s) for s in m.camera_stamps) for m in msgs}
    assert tuple(logged) not in published_sets  # the failed set is the one missing
    with rig.recorder.lock:
        assert all(s in rig.recorder.by_stamp[k] for k, s in enumerate(logged))


class SlowModel:
    """A model that takes at least `seconds` per call: cameras become faster than the model."""

    def __init__(self, model, seconds):
        self.model, self.seconds = model, seconds
        self.name, self.device = model.name, model.device

    def encode(self, images, prompts):
        time.sleep(self.seconds)
        return self.model.encode(images, prompts)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_under_load_memory_queues_and_latency_stay_bounded(rigs, model, monkeypatch):
    """Cameras at 40 Hz, the model needs 150 ms per batch of at most 2 sets: the set queue sits
    at its limit, the oldest sets are dropped and counted, memory does not grow and latency
    stays bounded (it does not creep up over the run)."""
    import weakref

    import qvl_ros.core.intake as intake_module  # the node's intake converts the frames

    depth, max_size, model_s, queue_size, n_cams = 3, 2, 0.15, 5, 3
    frames_alive = weakref.WeakSet()  # every frame tensor the node has made and still holds

    def tracked_conversion(*args, **kwargs):
        frame = node_module_conversion(*args, **kwargs)
        frames_alive.add(frame)
        return frame

    node_module_conversion = intake_module.msg_to_tensor
    monkeypatch.setattr(intake_module, "msg_to_tensor", tracked_conversion)
    rig = rigs(topics=[f"l{k}/image_raw" for k in range(n_cams)], sizes=["448x336"], jitter_ms=2.0,
               node_model=SlowModel(model, model_s), keep_frames=False,
               node_params=[("batch.max_size", max_size), ("batch.queue_depth", depth),
                            ("batch.max_wait_ms", 5.0), ("sync.queue_size", queue_size), ("sync.slop", 0.01)])
    samples = []  # (batch queue depth, largest synchronizer queue, frames alive, RSS MB)

    def sample(i):
        if i % 4 == 0:
            s = rig.node.pipeline_stats()
            samples.append((s["batch"]["depth"], max(s["sync"]["pending"]), len(frames_alive), _rss_mb()))

    ticks = 160  # 4 s at 40 Hz
    rig.drive(ticks, period=0.025, each=sample)
    rig.settle(timeout=30.0)
    stats = rig.node.pipeline_stats()
    assert max(x[0] for x in samples) <= depth
    assert stats["batch"]["max_depth_seen"] == depth  # the queue did reach its limit
    assert max(x[1] for x in samples) <= queue_size
    assert stats["batch"]["drops"]["queue_full"] > 0
    assert stats["sync"]["sets"] == stats["batch"]["put"] == (
        stats["batch"]["processed"] + stats["batch"]["drops"]["queue_full"] + stats["batch"]["drops"]["shutdown"])
    # Memory. The frames are what a leak would be made of: the node holds at most the
    # synchronizer queues, the set queue, the batch in flight and one conversion per camera.
    frame_bound = n_cams * (queue_size + depth + max_size + 1)
    assert max(x[2] for x in samples) <= frame_bound, [x[2] for x in samples]
    assert n_cams * stats["sync"]["sets"] > 4 * frame_bound  # far more frames went through
    # The resident size levels off: over the last third of the run it grows by less than what
    # keeping that third's frames would take (53 ticks x 3 frames x 452 KB = 72 MB).
    third = len(samples) // 3
    rss_mid = max(x[3] for x in samples[third:2 * third])
    rss_end = max(x[3] for x in samples[2 * third:])
    assert rss_end - rss_mid < 30, [round(x[3]) for x in samples]
    # Latency: bounded by the queue (depth / max_size batches) plus the batch in flight.
    # In units of the measured batch time (>= model_s; more when the CPU is shared): the batch
    # in flight, then at most ceil(depth / max_size) batches including the set's own; one more
    # batch time and 0.1 s of margin for conversion, synchronization and DDS.
    lat = [x for _, x in rig.collector.got(rig.collector.features)]
    assert len(lat) == stats["monitor"]["published"] >= 4  # every published set, however fast the CPU
    batch_s = stats["monitor"]["batch_s"]
    assert batch_s["p50"] >= model_s
    bound = (math.ceil(depth / max_size) + 2) * batch_s["max"] + 0.1
    half = len(lat) // 2
    first, second = sorted(lat[:half]), sorted(lat[half:])
    assert second[-1] < bound, (second[-1], bound, batch_s)
    assert second[len(second) // 2] < first[len(first) // 2] + 0.5 * bound  # no creeping growth
    status = rig.collector.pipeline_status(rig.fqn)[f"{rig.fqn}: pipeline"]
    assert int(status[2]["drops.batch.queue_full"]) > 0 and int(status[2]["queue_limit"]) == depth


def test_use_sim_time(rigs):
    """With use_sim_time the stamps and the latency follow /clock; a jump back resets the
    synchronizer and serving continues on the new timeline."""
    rig = rigs(topics=["c0/image_raw", "c1/image_raw"], node_params=[("use_sim_time", True)],
               camera_params=[("use_sim_time", True)])
    c = rig.collector
    sim = {"t": 1000 * 10**9}

    def publish_clock():
        c.clock_pub.publish(Clock(clock=time_msg(sim["t"])))

    assert wait_for(lambda: (publish_clock() or True) and rig.node.get_clock().now().nanoseconds == sim["t"]
                    and rig.cameras.get_clock().now().nanoseconds == sim["t"], 10, 0.05)

    def advance(i):
        sim["t"] += 100_000_000
        publish_clock()
        assert wait_for(lambda: rig.node.get_clock().now().nanoseconds == sim["t"]
                        and rig.cameras.get_clock().now().nanoseconds == sim["t"], 10, 0.005)

    rig.drive(12, each=advance)
    rig.settle()
    first = rig.collector.feature_msgs()
    assert len(first) >= 9
    assert all(999 * 10**9 < stamp_ns(m.header.stamp) < 1003 * 10**9 for m in first)
    lat = rig.node.pipeline_stats()["monitor"]["latency_s"]
    assert lat["count"] > 0 and abs(lat["p95"]) < 0.5  # sim-time latency, not wall time minus 1000 s

    sim["t"] = 500 * 10**9  # bag loop: time goes back
    publish_clock()
    assert wait_for(lambda: rig.node.get_clock().now().nanoseconds == sim["t"], 5)
    rig.drive(12, each=advance)
    rig.settle()
    later = [m for m in rig.collector.feature_msgs() if stamp_ns(m.header.stamp) < 600 * 10**9]
    assert len(later) >= 9
    assert rig.node.pipeline_stats()["sync"]["resets"] >= 1
    assert any("time went back" in m for m in c.node_logs(20, rig.fqn))


def test_parameters_read_only_dynamic_and_validated(rigs):
    rig = rigs(topics=["p0/image_raw", "p1/image_raw"])
    node = rig.node
    res = node.set_parameters([Parameter("camera_topics", value=["x"])])[0]
    assert not res.successful and "read-only" in res.reason
    assert not node.set_parameters([Parameter("features", value=["bogus"])])[0].successful
    assert not node.set_parameters([Parameter("batch.max_size", value=0)])[0].successful
    assert node.set_parameters([Parameter("batch.max_size", value=2)])[0].successful
    assert node.pipeline_stats()["batch"]["max_size"] == 2
    assert node.set_parameters([Parameter("batch.max_wait_ms", value=3)])[0].successful  # int for a double
    assert node.pipeline_stats()["batch"]["max_wait_ms"] == pytest.approx(3.0)
    assert node.set_parameters([Parameter("features", value=["vision"])])[0].successful
    rig.drive(5)
    rig.settle()
    last = rig.collector.feature_msgs()[-1]
    assert [t.name for t in last.tensors] == [f"vision/{n}" for n in node.camera_names]
    for name in ("camera_topics", "sync.slop", "model.path", "qos.reliability", "batch.queue_depth"):
        assert node.describe_parameter(name).read_only, name
    for name in ("prompt", "features", "caption.enabled", "batch.max_size"):
        assert not node.describe_parameter(name).read_only, name


@pytest.mark.parametrize("overrides, words", [
    ([("camera_topics", ["a", "b"]), ("camera_names", ["only_one"])], "camera_names has 1 entries"),
    ([("camera_names", ["x", "x", "y"])], "unique"),
    ([("features", ["vision", "logits"])], "features must be"),
    ([("sync.stamp_source", "gps")], "stamp_source"),
    ([("qos.reliability", "sometimes")], "qos.reliability"),
    ([("sync.slop", -0.1)], "sync.slop"),
])
def test_invalid_startup_parameters_are_refused(ros, model, overrides, words):
    context, _ = ros
    with pytest.raises(ValueError, match=words):
        QvlNode(model=model, context=context, namespace=f"/bad{next(_ns_counter)}",
                parameter_overrides=[Parameter(k, value=v) for k, v in overrides])


def test_frames_without_stamps_use_arrival_time_in_auto_mode(rigs):
    """sync.stamp_source=auto: a camera driver that leaves header.stamp at zero still gets
    synchronized, on the node's receive time."""
    rig = rigs(topics=["z0/image_raw", "z1/image_raw"], node_params=[("sync.stamp_source", "auto")])
    pubs = [p for p in rig.cameras.publishers if p.topic_name in rig.cameras.resolved_topics]
    t_start = rig.node.get_clock().now().nanoseconds
    for tick in range(8):
        for i, pub in enumerate(pubs):
            pub.publish(rig.cameras.make_message(i, tick, 0))
        time.sleep(0.1)
    rig.settle()
    msgs = rig.collector.feature_msgs()
    assert len(msgs) >= 6
    t_end = rig.node.get_clock().now().nanoseconds
    for m in msgs:
        stamps = [stamp_ns(s) for s in m.camera_stamps]
        assert all(t_start < s < t_end for s in stamps)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_config_file_documents_every_parameter(rigs):
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "config" / "multi_cam.yaml").read_text()
    data = yaml.safe_load(text)
    node_key = next(k for k in data if k.endswith("qvl_node"))
    params = _flatten(data[node_key]["ros__parameters"])
    rig = rigs(topics=["d0/image_raw"])
    declared = set(rig.node.list_parameters([], 0).names) - {"use_sim_time", "start_type_description_service"}
    assert set(params) <= declared
    # camera_names: derived from the topics unless set; detect.classes: an empty list (no type in a file)
    assert declared - set(params) == {"camera_names", "detect.classes"}
    for name in declared:  # every parameter is documented by a comment just above it
        leaf = name.split(".")[-1]
        assert re.search(rf"#.*\n\s*(# )?{re.escape(leaf)}:", text), name


def test_entry_point_with_params_file_and_clean_ctrl_c(tiny_path, tmp_path):
    """`python -m qvl_ros.ros.node --ros-args --params-file config/multi_cam.yaml` starts, serves
    synthetic cameras started by `python -m qvl_ros.sim.synthetic`, and exits 0 on SIGINT."""
    ns = f"/ep_{os.getpid()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", QVL_ROS_CACHE=str(tmp_path))
    node = subprocess.Popen(
        [sys.executable, "-m", "qvl_ros.node", "--ros-args", "--params-file", str(ROOT / "config" / "multi_cam.yaml"),
         "-r", f"__ns:={ns}", "-p", f"model.path:={tiny_path}",
         "-p", "camera_topics:=[cam0/image_raw, cam1/image_raw/compressed]"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(node.stdout.readline, "")), daemon=True)
    reader.start()
    cams = listener = None
    try:
        assert wait_for(lambda: any("ready:" in line for line in lines), 60, 0.1), "".join(lines)
        cams = subprocess.Popen(
            [sys.executable, "-m", "qvl_ros.synthetic", "--topics", "cam0/image_raw", "cam1/image_raw/compressed",
             "--rate", "10", "--duration", "20", "--ros-args", "-r", f"__ns:={ns}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        listener = subprocess.run(
            [sys.executable, "-m", "qvl_ros.listener", "--count", "5", "--duration", "30",
             "--ros-args", "-r", f"__ns:={ns}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert listener.returncode == 0, listener.stdout + listener.stderr
        assert "features #5" in listener.stdout and "vision/cam0" in listener.stdout
        node.send_signal(signal.SIGINT)
        assert node.wait(20) == 0, "".join(lines)
    finally:
        for p in (cams, node):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
    reader.join(5)
    assert not any("Traceback" in line for line in lines), "".join(lines)


# ----------------------------------------------------------------------------- issue 12: node features
class GatedModel:
    """Forwards to a model; while `gate` is clear, each model call waits for it (so tests can
    hold the worker in a call and let sets queue behind it)."""

    def __init__(self, model):
        self._model = model
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _wrap(self, fn, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(60)
        return fn(*args, **kwargs)

    def encode(self, *a, **k):
        return self._wrap(self._model.encode, *a, **k)

    def encode_generate(self, *a, **k):
        return self._wrap(self._model.encode_generate, *a, **k)

    def generate(self, *a, **k):
        return self._wrap(self._model.generate, *a, **k)

    def warmup(self, *a, **k):
        return self._wrap(self._model.warmup, *a, **k)


def call(node, client, request, timeout=30.0):
    """Call a service from the test thread (the module's executor spins the client's node)."""
    assert client.wait_for_service(timeout_sec=20)
    future = client.call_async(request)
    done = threading.Event()
    future.add_done_callback(lambda _f: done.set())
    assert done.wait(timeout), f"no response from {client.srv_name}"
    return future.result()


def test_messages_carry_input_headers_model_sizes_grids_and_hidden_rows(rigs, tiny_path):
    """Per camera the input header (stamp and frame_id as sent), the image size the model saw and
    the vision grid, checked against transformers' processor; `hidden_rows` marks the image
    tokens of each camera and the text, checked against that processor's input ids."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_path))
    rig = rigs(topics=["front/image_raw", "side/image_raw"], sizes=["224x168", "300x200"])
    rig.drive(4)
    rig.settle()
    msgs = rig.collector.feature_msgs()
    assert msgs
    image_token = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for m in msgs:
        assert len(m.inputs) == 2
        sent = [rig.recorder.by_stamp[k][stamp_ns(s)] for k, s in enumerate(m.camera_stamps)]
        frames = rig.recorder.frames([stamp_ns(s) for s in m.camera_stamps])
        conv = [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": PROMPT}]}]
        text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ref = proc(text=[text], images=[f.permute(1, 2, 0).numpy() for f in frames], return_tensors="pt")
        grids = ref["image_grid_thw"].tolist()
        for k, inp in enumerate(m.inputs):
            assert inp.header.frame_id == sent[k].header.frame_id and inp.header.frame_id in ("front", "side")
            assert inp.header.stamp == sent[k].header.stamp == m.camera_stamps[k]  # old field kept
            assert list(inp.grid_thw) == grids[k]
            assert (inp.height, inp.width) == (grids[k][1] * 14, grids[k][2] * 14)
            rows = features_to_numpy(m)[f"vision/{rig.node.camera_names[k]}"].shape[0]
            assert rows == grids[k][0] * grids[k][1] * grids[k][2] // 4
        # hidden_rows: runs over the processor's ids, the k-th image run being camera k
        ids = ref["input_ids"][0].tolist()
        expected, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or (ids[i] == image_token) != (ids[start] == image_token):
                expected.append(("img" if ids[start] == image_token else "text", start, i - start))
                start = i
        names = iter(f"vision/{n}" for n in rig.node.camera_names)
        expected = [(next(names) if src == "img" else "text", a, n) for src, a, n in expected]
        assert [(r.source, r.start, r.count) for r in m.hidden_rows] == expected
        assert sum(r.count for r in m.hidden_rows) == features_to_numpy(m)["hidden"].shape[0]


def test_ask_round_trips_while_features_keep_flowing(rigs, oracle):
    """~/ask answers from the newest synchronized set (the answer equals generate on that set's
    frames) while the cameras keep running; a bounded queue refuses the surplus; unknown
    cameras and a node without a set get clear errors."""
    from qvl_ros.srv import Ask

    gated = None
    rig = rigs(topics=["q0/image_raw", "q1/image_raw"], node_params=[("ask.queue_depth", 1)])
    client = rig.collector.create_client(Ask, f"{rig.fqn}/ask")
    # Before any frame: no set.
    res = call(rig.collector, client, Ask.Request(prompt="What is there?"))
    assert not res.success and "no synchronized set" in res.message

    stop = threading.Event()
    feeder = threading.Thread(target=lambda: [rig.cameras.publish_tick() or time.sleep(0.1)
                                              for _ in iter(lambda: stop.is_set(), True)], daemon=True)
    feeder.start()
    try:
        assert wait_for(lambda: len(rig.collector.feature_msgs()) >= 3, 30)
        for prompt, cams, tokens in (("What is there?", [], 6), ("Colours?", ["q1"], 4)):
            before = len(rig.collector.feature_msgs())
            res = call(rig.collector, client, Ask.Request(prompt=prompt, camera_names=cams, max_new_tokens=tokens))
            assert res.success, res.message
            used = cams or rig.node.camera_names
            assert list(res.camera_names) == used
            stamps = [stamp_ns(h.stamp) for h in res.camera_headers]
            assert stamp_ns(res.stamp) == max(stamps)
            with rig.recorder.lock:
                idx = [rig.node.camera_names.index(n) for n in used]
                frames = [msg_to_tensor(rig.recorder.by_stamp[k][s]) for k, s in zip(idx, stamps)]
                assert [rig.recorder.by_stamp[k][s].header.frame_id for k, s in zip(idx, stamps)] == \
                    [h.frame_id for h in res.camera_headers]
            assert res.text == oracle.generate([frames], [prompt], max_new_tokens=tokens)[0].replace("\x00", "")
            # the feature stream went on around the question
            assert wait_for(lambda: len(rig.collector.feature_msgs()) >= before + 3, 30)
        res = call(rig.collector, client, Ask.Request(prompt="x", camera_names=["nope"]))
        assert not res.success and "unknown camera" in res.message and "q0" in res.message
    finally:
        stop.set()
        feeder.join(5)

    # Bounded queue: hold the worker in one answer, a second waits, a third is refused at once.
    gated = GatedModel(rig.node.model)
    rig.node.model = gated
    gated.gate.clear()
    futures = [client.call_async(Ask.Request(prompt="a", max_new_tokens=2))]
    assert gated.entered.wait(20)
    futures.append(client.call_async(Ask.Request(prompt="b", max_new_tokens=2)))
    assert rig.node._batcher.wait_for(lambda s: s["tasks_waiting"] == 1, 20)
    futures.append(client.call_async(Ask.Request(prompt="c", max_new_tokens=2)))
    assert wait_for(lambda: futures[2].done(), 20)
    assert not futures[2].result().success and "busy" in futures[2].result().message
    gated.gate.set()
    assert wait_for(lambda: futures[0].done() and futures[1].done(), 30)
    assert futures[0].result().success and futures[1].result().success


def test_lifecycle_transitions_with_change_state(rigs, model, oracle):
    """The managed node: nothing loaded or subscribed until configure/activate; deactivate
    stops the work and drops the queued sets; cleanup frees the model; it can start again."""
    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    from qvl_ros.ros.node import QvlLifecycleNode

    gated = GatedModel(model)
    rig = rigs(topics=["lc0/image_raw", "lc1/image_raw"], node_class=QvlLifecycleNode, node_model=gated,
               node_params=[("batch.max_size", 1), ("batch.queue_depth", 3)])
    c, node = rig.collector, rig.node
    change = c.create_client(ChangeState, f"{rig.fqn}/change_state")
    get = c.create_client(GetState, f"{rig.fqn}/get_state")

    def transition(tid):
        return call(c, change, ChangeState.Request(transition=Transition(id=tid))).success

    def state():
        return call(c, get, GetState.Request()).current_state.id

    cams = rig.camera_publishers()
    assert state() == State.PRIMARY_STATE_UNCONFIGURED and node.model is None
    assert c.count_publishers(f"{rig.ns}/features") == 0
    assert transition(Transition.TRANSITION_CONFIGURE) and state() == State.PRIMARY_STATE_INACTIVE
    assert node.model is gated and gated.calls == 1  # loaded and warmed up
    assert wait_for(lambda: c.count_publishers(f"{rig.ns}/features") == 1)
    assert all(p.get_subscription_count() == 0 for p in cams)  # inactive: not subscribed

    assert transition(Transition.TRANSITION_ACTIVATE) and state() == State.PRIMARY_STATE_ACTIVE
    rig.wait_connected()
    rig.drive(6)
    rig.settle()
    msgs = c.feature_msgs()
    assert len(msgs) >= 3
    assert_matches_oracle(oracle, rig, msgs[-1])

    # Deactivate with a set in flight and sets queued: queued ones are dropped and counted,
    # the one in flight finishes but is not published.
    gated.entered.clear()
    gated.gate.clear()
    rig.drive(1)
    assert gated.entered.wait(20)
    rig.drive(3)
    assert node._batcher.wait_for(lambda s: s["depth"] == 3, 20)
    published = node.pipeline_stats()["monitor"]["published"]
    future = change.call_async(ChangeState.Request(transition=Transition(id=Transition.TRANSITION_DEACTIVATE)))
    assert node._batcher.wait_for(lambda s: s["drops"]["inactive"] == 3, 20)
    gated.gate.set()
    assert wait_for(lambda: future.done(), 30) and future.result().success
    assert state() == State.PRIMARY_STATE_INACTIVE
    stats = node.pipeline_stats()
    assert stats["monitor"]["published"] == published
    assert stats["monitor"]["set_drops"]["inactive"] == 4  # three queued, one in flight
    assert wait_for(lambda: all(p.get_subscription_count() == 0 for p in cams))
    count = len(c.feature_msgs())
    rig.drive(3)
    assert node.pipeline_stats()["monitor"]["cameras"][0]["received"] == stats["monitor"]["cameras"][0]["received"]
    assert len(c.feature_msgs()) == count

    assert transition(Transition.TRANSITION_CLEANUP) and state() == State.PRIMARY_STATE_UNCONFIGURED
    assert node.model is None
    assert wait_for(lambda: c.count_publishers(f"{rig.ns}/features") == 0)
    # And back up again.
    assert transition(Transition.TRANSITION_CONFIGURE) and transition(Transition.TRANSITION_ACTIVATE)
    rig.wait_connected()
    rig.drive(4)
    rig.settle()
    assert len(c.feature_msgs()) >= count + 2


def test_lazy_subscribes_to_cameras_only_while_someone_listens(rigs):
    rig = rigs(topics=["z0/image_raw", "z1/image_raw"], node_params=[("lazy", True)], outputs=False)
    cams = rig.camera_publishers()
    assert wait_for(lambda: all(p.get_subscription_count() == 0 for p in cams), 10)
    rig.drive(3)
    assert rig.node.pipeline_stats()["sync"]["sets"] == 0 and not rig.node.subscribed

    for round_ in range(2):  # a subscriber comes and goes, twice
        got = []
        listener = rig.collector.create_subscription(VisionFeatures, "features", got.append, 10)
        assert wait_for(lambda: all(p.get_subscription_count() == 1 for p in cams), 20), round_
        assert wait_for(lambda: rig.node._features_pub.get_subscription_count() == 1, 20)
        sets_before = rig.node.pipeline_stats()["sync"]["sets"]
        rig.drive(5)
        assert wait_for(lambda: len(got) >= 3, 20), round_
        rig.collector.destroy_subscription(listener)
        assert wait_for(lambda: all(p.get_subscription_count() == 0 for p in cams), 20), round_
        assert rig.node.wait_idle(20)
        sets_after = rig.node.pipeline_stats()["sync"]["sets"]
        assert sets_after >= sets_before + 3
        rig.drive(3)  # nobody listens: frames are not even received
        assert rig.node.pipeline_stats()["sync"]["sets"] == sets_after
    assert any("no subscriber left" in m for m in rig.collector.node_logs(20, rig.fqn))
    assert not any("stale" in m for m in rig.collector.node_logs(30, rig.fqn))  # unsubscribed on purpose


def test_max_rate_caps_sets_per_second_on_the_node_clock(rigs):
    """Sim time steps of 100 ms (10 sets/s) with max_rate 4: about 4 of every 10 sets pass
    (40 % plus at most one), the rest are dropped and counted as rate_limit."""
    rig = rigs(topics=["r0/image_raw", "r1/image_raw"], jitter_ms=0.0,
               node_params=[("use_sim_time", True), ("max_rate", 4.0)], camera_params=[("use_sim_time", True)])
    sim = {"t": 2000 * 10**9}

    def tick_clock(i=None):
        sim["t"] += 100_000_000
        rig.collector.clock_pub.publish(Clock(clock=time_msg(sim["t"])))
        assert wait_for(lambda: rig.node.get_clock().now().nanoseconds == sim["t"]
                        and rig.cameras.get_clock().now().nanoseconds == sim["t"], 10, 0.005)

    tick_clock()
    ticks = 30
    for _ in range(ticks):
        tick_clock()
        before = sum(rig.node.pipeline_stats()["sync"]["received"])
        rig.cameras.publish_tick()
        # the node sees this tick's frames on this tick's clock
        assert wait_for(lambda: sum(rig.node.pipeline_stats()["sync"]["received"]) >= before + 2, 10)
    rig.settle()
    stats = rig.node.pipeline_stats()
    made, put = stats["sync"]["sets"], stats["batch"]["put"]
    assert made == ticks
    assert put + stats["monitor"]["set_drops"]["rate_limit"] == made
    assert 12 <= put <= 13  # 3 s at 4 sets/s, plus the one early slot
    assert len(rig.collector.feature_msgs()) == put
    # The cap is dynamic: 0 lifts it.
    assert rig.node.set_parameters([Parameter("max_rate", value=0.0)])[0].successful
    for _ in range(5):
        tick_clock()
        rig.cameras.publish_tick()
    rig.settle()
    assert rig.node.pipeline_stats()["batch"]["put"] == put + 5


def test_skewed_camera_clocks_raise_an_error_with_the_drop_reason(rigs):
    """Two live cameras whose stamps disagree by 50 ms (slop 30 ms): every frame is unmatched,
    no set is made; /diagnostics turns ERROR naming the reason and the log says so too."""
    rig = rigs(topics=["k0/image_raw", "k1/image_raw"], jitter_ms=0.0,
               camera_params=[("offsets_ms", [0.0, 50.0])],
               node_params=[("diagnostics.period", 0.2), ("diagnostics.no_set_after", 1.0),
                            ("diagnostics.expected_rates", [10.0]), ("diagnostics.rate_tolerance", 0.5)])
    stop = threading.Event()
    feeder = threading.Thread(target=lambda: [rig.cameras.publish_tick() or time.sleep(0.1)
                                              for _ in iter(lambda: stop.is_set(), True)], daemon=True)
    feeder.start()
    try:
        def error_status():
            status = rig.collector.pipeline_status(rig.fqn)
            return status is not None and status[f"{rig.fqn}: pipeline"][0] == 2 and status
        assert wait_for(error_status, 30)
        status = error_status()
        level, message, values = status[f"{rig.fqn}: pipeline"]
        assert "no synchronized set" in message and "unmatched" in message
        assert rig.node.pipeline_stats()["sync"]["sets"] == 0
        for name in rig.node.camera_names:  # the cameras themselves are fine
            assert status[f"{rig.fqn}: camera {name}"][2]["stale"] == "false"
        assert wait_for(lambda: any("no synchronized set" in m for m in rig.collector.node_logs(40, rig.fqn)), 10)
        arr = rig.collector.got(rig.collector.diagnostics)[-1]
        ids = {s.name: s.hardware_id for s in arr.status}
        assert ids[f"{rig.fqn}: pipeline"] == "cpu"
        assert ids[f"{rig.fqn}: camera k1"] == "k1"  # the camera's frame_id
    finally:
        stop.set()
        feeder.join(5)


def test_humble_fallback_without_post_set_parameters_callback(rigs, monkeypatch):
    """rclpy before Iron has no add_post_set_parameters_callback: with it hidden, run-time
    parameters are still validated and applied."""
    monkeypatch.delattr(Node, "add_post_set_parameters_callback")
    rig = rigs(topics=["h0/image_raw", "h1/image_raw"])
    node = rig.node
    assert not hasattr(node, "add_post_set_parameters_callback")
    assert not node.set_parameters([Parameter("batch.max_size", value=0)])[0].successful
    assert node.pipeline_stats()["batch"]["max_size"] == 4
    assert node.set_parameters([Parameter("batch.max_size", value=2)])[0].successful
    assert node.pipeline_stats()["batch"]["max_size"] == 2
    assert node.set_parameters([Parameter("max_rate", value=3.0)])[0].successful
    assert node._intake.rate.max_rate == pytest.approx(3.0)
    rig.drive(4)
    rig.settle()
    assert len(rig.collector.feature_msgs()) >= 2


def test_clock_jump_back_drops_the_queued_sets_of_the_old_timeline(rigs, model):
    gated = GatedModel(model)
    rig = rigs(topics=["j0/image_raw", "j1/image_raw"], node_model=gated, jitter_ms=0.0,
               node_params=[("use_sim_time", True), ("batch.max_size", 1), ("batch.queue_depth", 4)],
               camera_params=[("use_sim_time", True)])
    c = rig.collector
    sim = {"t": 1000 * 10**9}

    def set_clock(t):
        sim["t"] = t
        c.clock_pub.publish(Clock(clock=time_msg(t)))
        assert wait_for(lambda: rig.node.get_clock().now().nanoseconds == t
                        and rig.cameras.get_clock().now().nanoseconds == t, 10, 0.005)

    set_clock(sim["t"])
    gated.gate.clear()
    gated.entered.clear()
    for i in range(5):  # one set in flight, four queued
        set_clock(sim["t"] + 100_000_000)
        rig.cameras.publish_tick()
        if i == 0:
            assert gated.entered.wait(20)
    assert rig.node._batcher.wait_for(lambda s: s["depth"] == 4, 20)
    set_clock(500 * 10**9)  # bag loop
    assert rig.node._batcher.wait_for(lambda s: s["drops"]["time_reset"] == 4 and s["depth"] == 0, 20)
    gated.gate.set()
    for _ in range(5):
        set_clock(sim["t"] + 100_000_000)
        rig.cameras.publish_tick()
    rig.settle()
    stamps = [stamp_ns(m.header.stamp) for m in c.feature_msgs()]
    assert stamps and all(s < 600 * 10**9 for s in stamps)  # nothing of the old timeline came out
    assert rig.node.pipeline_stats()["monitor"]["set_drops"]["time_reset"] == 5  # four queued + in flight
    assert wait_for(lambda: any("4 queued set(s) of the old timeline dropped" in m
                                for m in c.node_logs(20, rig.fqn)), 10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_end_node_listener_and_cameras_cleanly(tiny_path, tmp_path, sig):
    """Node under load (cameras faster than the model, batches in flight), listener and
    synthetic cameras: SIGINT or SIGTERM ends each with exit code 0, no traceback, no error."""
    ns = f"/sig{sig}_{os.getpid()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", QVL_ROS_CACHE=str(tmp_path))
    ros_ns = ["--ros-args", "-r", f"__ns:={ns}"]
    outputs = {}

    def start(name, args):
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=ROOT)
        lines = outputs[name] = []
        threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
        return proc

    procs = {}
    try:
        procs["node"] = start("node", ["qvl_ros.node", *ros_ns, "-p", f"model.path:={tiny_path}",
                                       "-p", "camera_topics:=[a/image_raw, b/image_raw]",
                                       "-p", "batch.max_size:=2", "-p", "caption.enabled:=true"])
        assert wait_for(lambda: any("ready:" in x for x in outputs["node"]), 90, 0.1), "".join(outputs["node"])
        procs["cams"] = start("cams", ["qvl_ros.synthetic", "--topics", "a/image_raw", "b/image_raw",
                                       "--rate", "60", "--size", "448x336", *ros_ns])
        procs["listener"] = start("listener", ["qvl_ros.listener", *ros_ns])
        assert wait_for(lambda: sum("features #" in x for x in outputs["listener"]) >= 3, 90, 0.1), \
            "".join(outputs["node"] + outputs["listener"])
        for name in ("node", "listener", "cams"):
            procs[name].send_signal(sig)
            assert procs[name].wait(30) == 0, (name, "".join(outputs[name]))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(5)
    time.sleep(0.2)  # let the reader threads take the last lines
    for name, lines in outputs.items():
        text = "".join(lines)
        assert "Traceback" not in text and "[ERROR]" not in text and "model failed" not in text, (name, text)
        assert "context is invalid" not in text, (name, text)


def test_warmup_deferred_to_the_first_sets_sizes(rigs):
    """model.warmup_size empty: the worker warms the model up for the first set's frame sizes and
    every decode batch bucket up to batch.max_size before running it; /diagnostics reports the
    graphs captured after warm-up (none: no graphs on the CPU, and none after warm-up anywhere)."""
    rig = rigs(topics=["w0/image_raw", "w1/image_raw"], sizes=["224x168", "280x210"],
               node_params=[("model.warmup_size", ""), ("caption.enabled", True), ("caption.max_new_tokens", 4),
                            ("diagnostics.period", 0.25)])
    rig.drive(6)
    rig.settle()
    logs = rig.collector.node_logs(20, rig.fqn)
    done = [m for m in logs if m.startswith("warm-up for frames")]
    assert len(done) == 1 and re.fullmatch(r"warm-up for frames 168x224, 210x280, batches \[1, 2, 4\]: [\d.]+ s",
                                           done[0]), logs
    msgs = rig.collector.feature_msgs()
    stats = rig.node.pipeline_stats()
    assert msgs and stats["monitor"]["published"] == stats["sync"]["sets"] == len(msgs)
    assert wait_for(lambda: "graph captures after warm-up" in rig.collector.pipeline_status(rig.fqn)[
        f"{rig.fqn}: pipeline"][2])
    assert rig.collector.pipeline_status(rig.fqn)[f"{rig.fqn}: pipeline"][2]["graph captures after warm-up"] == "0"
