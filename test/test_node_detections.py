"""Detections in qvl_node over real DDS (rclpy in this process, localhost, a random domain), with
the tiny random checkpoint and constrained decoding (llguidance), so every answer is a valid
detection list.

Oracles: the headers and frames the test itself publishes (each array and annotated image must
carry its camera's input header; the annotated image must differ from the published frame
exactly along each detection's box outline outside the label band), the class list given, the
image bounds, and a node process that cannot import vision_msgs (a module on PYTHONPATH that
shadows it and raises ImportError).
"""
import os
import random
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
pytest.importorskip("vision_msgs.msg")
pytest.importorskip("llguidance")

from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from vision_msgs.msg import Detection2DArray  # noqa: E402

from qvl_ros.msg import VisionFeatures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
CLASSES = ["cup", "chair"]
CAMERAS = {"left": (72, 96, "left_optical"), "right": (96, 64, "right_optical")}  # name: (H, W, frame_id)
GRAY = 128
THICKNESS = 2  # the annotated image's box outline, pixels inward from the box's rounded corners


@pytest.fixture(scope="module")
def model(tiny_path):
    from qvl_ros.model import BatchedQwenVL

    return BatchedQwenVL.from_pretrained(tiny_path, device="cpu", dtype="float32")


def _wait(pred, timeout=60.0):
    return wait_for(pred, timeout)


def _frame_msg(sec, h, w, frame_id, rng=None):
    m = Image()
    m.header.stamp.sec, m.header.frame_id = sec, frame_id
    m.height, m.width, m.encoding, m.step = h, w, "rgb8", 3 * w
    data = np.full((h, w, 3), GRAY, np.uint8) if rng is None else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    m.data = data.tobytes()
    return m


class Peer(Node):
    """Publishes the cameras, records features, arrays and annotated images by camera."""

    def __init__(self, context, ns):
        super().__init__("peer", context=context, namespace=ns)
        self.lock = threading.Lock()
        self.features, self.arrays, self.images = [], {n: [] for n in CAMERAS}, {n: [] for n in CAMERAS}
        self.create_subscription(VisionFeatures, "features", self._keep(self.features), 100)
        for name in CAMERAS:
            self.create_subscription(Detection2DArray, f"{name}/detections", self._keep(self.arrays[name]), 100)
            self.create_subscription(Image, f"{name}/detections/image", self._keep(self.images[name]), 100)
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.pubs = {name: self.create_publisher(Image, f"{name}/image_raw", qos) for name in CAMERAS}

    def _keep(self, store):
        def cb(msg):
            with self.lock:
                store.append(msg)
        return cb

    def got(self, store):
        with self.lock:
            return list(store)

    def publish_set(self, sec, rng=None):
        sent = {}
        for name, (h, w, frame_id) in CAMERAS.items():
            sent[name] = _frame_msg(sec, h, w, frame_id, rng)
            self.pubs[name].publish(sent[name])
        return sent


class Rig:
    def __init__(self, ros, model, params):
        from qvl_ros.ros.node import QvlNode

        self.context, self.executor = ros
        ns = f"/det_{random.randrange(1 << 30)}"
        self.node = QvlNode(model=model, context=self.context, namespace=ns, parameter_overrides=[
            Parameter("camera_topics", value=[f"{n}/image_raw" for n in CAMERAS]),
            Parameter("qos.reliability", value="reliable"), Parameter("qos.depth", value=50),
            Parameter("features", value=["vision"]), Parameter("sync.slop", value=0.01),
            Parameter("detect.classes", value=CLASSES), Parameter("detect.max_detections", value=1),
            Parameter("detect.min_detections", value=1), *[Parameter(k, value=v) for k, v in params]])
        self.peer = Peer(self.context, ns)
        for n in (self.node, self.peer):
            self.executor.add_node(n)
        assert _wait(lambda: all(p.get_subscription_count() >= 1 for p in self.peer.pubs.values()), 20)
        assert _wait(lambda: self.node._features_pub.get_subscription_count() >= 1, 20)

    def close(self):
        for n in (self.node, self.peer):
            self.executor.remove_node(n)
            n.destroy_node()


@pytest.fixture
def rig(ros, model):
    made = []

    def make(params):
        made.append(Rig(ros, model, params))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _box_pixels(det):
    """The detection's box as the rounded integer corners (x1, y1, x2, y2) the outline goes through."""
    cx, cy, sx, sy = det.bbox.center.position.x, det.bbox.center.position.y, det.bbox.size_x, det.bbox.size_y
    return tuple(int(round(v)) for v in (cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2))


def test_arrays_and_annotated_images_for_every_set_with_each_cameras_header(rig):
    r = rig([("detect.enabled", True), ("detect.annotated_image", True)])
    sent = [r.peer.publish_set(1_700_000_000 + k) for k in range(3)]
    assert _wait(lambda: all(len(r.peer.got(r.peer.arrays[n])) >= 3 and len(r.peer.got(r.peer.images[n])) >= 3
                             for n in CAMERAS), 120), r.node.pipeline_stats()
    assert len(r.peer.got(r.peer.features)) == 3
    for name, (h, w, frame_id) in CAMERAS.items():
        arrays = r.peer.got(r.peer.arrays[name])
        assert [(a.header.stamp.sec, a.header.stamp.nanosec) for a in arrays] == [(1_700_000_000 + k, 0) for k in range(3)]
        for a in arrays:
            assert a.header.frame_id == frame_id and len(a.detections) == 1  # min = max = 1
            for d in a.detections:
                assert d.header == a.header
                assert d.results[0].hypothesis.class_id in CLASSES and 0 < d.results[0].hypothesis.score <= 1
                x1, y1 = d.bbox.center.position.x - d.bbox.size_x / 2, d.bbox.center.position.y - d.bbox.size_y / 2
                assert 0 <= x1 <= x1 + d.bbox.size_x <= w and 0 <= y1 <= y1 + d.bbox.size_y <= h
        images = r.peer.got(r.peer.images[name])
        for a, img, s in zip(arrays, images, sent):
            assert img.header == a.header and (img.height, img.width, img.encoding) == (h, w, "rgb8")
            _check_outline(np.frombuffer(bytes(img.data), np.uint8).reshape(h, w, 3),
                           np.frombuffer(bytes(s[name].data), np.uint8).reshape(h, w, 3), a.detections[0])


def _check_outline(out, frame, det):
    """Pixels changed exactly along the box outline (THICKNESS wide, inward), apart from the band
    around the box's top edge where its label may be written."""
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = _box_pixels(det)
    changed = np.any(out != frame, axis=2)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx >= x1) & (xx <= x2) & (yy >= y1) & (yy <= y2)
    depth = np.minimum(np.minimum(xx - x1, x2 - xx), np.minimum(yy - y1, y2 - yy))
    ring = inside & (depth < THICKNESS)
    baseline = max(y1 - 4, 10)
    label_band = (yy >= baseline - 16) & (yy <= baseline + 4)
    assert ring.any()
    assert changed[ring].all(), (x1, y1, x2, y2)  # every outline pixel drawn
    assert not changed[~ring & ~label_band].any(), (x1, y1, x2, y2)  # nothing else, outside the label band
    colours = {tuple(c) for c in out[ring & ~label_band]}
    assert len(colours) <= 1  # one colour per box


def test_clip_sets_are_detected_on_the_newest_frame_of_each_clip(rig):
    """video.frames 2: the first set has no full clip; each later set's arrays carry the header of
    its newest (matched) frames, and the annotated image is that frame, not an older one."""
    r = rig([("detect.enabled", True), ("detect.annotated_image", True), ("video.frames", 2)])
    rng = np.random.default_rng(7)
    sent = [r.peer.publish_set(1_700_000_300 + k, rng) for k in range(3)]
    assert _wait(lambda: all(len(r.peer.got(r.peer.images[n])) >= 2 for n in CAMERAS), 120), r.node.pipeline_stats()
    time.sleep(0.5)
    for name, (h, w, _) in CAMERAS.items():
        arrays, images = r.peer.got(r.peer.arrays[name]), r.peer.got(r.peer.images[name])
        assert [a.header.stamp.sec for a in arrays] == [1_700_000_301, 1_700_000_302]
        for img, s in zip(images, sent[1:]):
            out = np.frombuffer(bytes(img.data), np.uint8).reshape(h, w, 3)
            newest = np.frombuffer(bytes(s[name].data), np.uint8).reshape(h, w, 3)
            older = np.frombuffer(bytes(sent[sent.index(s) - 1][name].data), np.uint8).reshape(h, w, 3)
            same_newest = np.all(out == newest, axis=2).mean()
            assert same_newest > 0.5 and np.all(out == older, axis=2).mean() < 0.05, same_newest


def test_detect_enabled_toggles_at_run_time(rig):
    r = rig([])
    assert not r.node.set_parameters([Parameter("detect.min_detections", value=5)])[0].successful  # above max 1
    r.peer.publish_set(1_700_000_100)
    assert _wait(lambda: len(r.peer.got(r.peer.features)) >= 1)
    time.sleep(0.5)
    assert all(not r.peer.got(r.peer.arrays[n]) for n in CAMERAS)
    assert r.node.set_parameters([Parameter("detect.enabled", value=True)])[0].successful
    ns = r.node.get_namespace()
    assert _wait(lambda: all(r.node.count_subscribers(f"{ns}/{n}/detections") >= 1
                             and r.peer.count_publishers(f"{ns}/{n}/detections") == 1 for n in CAMERAS), 10)
    r.peer.publish_set(1_700_000_101)
    assert _wait(lambda: all(len(r.peer.got(r.peer.arrays[n])) == 1 for n in CAMERAS), 120)
    assert all(r.peer.got(r.peer.arrays[n])[0].header.stamp.sec == 1_700_000_101 for n in CAMERAS)
    res = r.node.set_parameters([Parameter("detect.classes", Parameter.Type.STRING_ARRAY, []),
                                 Parameter("detect.query", value="")])[0]
    assert not res.successful and "detect.classes or detect.query" in res.reason
    assert r.node.set_parameters([Parameter("detect.enabled", value=False)])[0].successful
    r.peer.publish_set(1_700_000_102)
    assert _wait(lambda: len(r.peer.got(r.peer.features)) >= 3)
    time.sleep(1.0)
    assert all(len(r.peer.got(r.peer.arrays[n])) == 1 for n in CAMERAS)  # none for the set after
    assert not any(r.peer.got(r.peer.images[n]) for n in CAMERAS)  # annotated_image is off by default


def test_start_without_vision_msgs_logs_once_and_publishes_features(tiny_path, tmp_path, ros):
    shadow = tmp_path / "shadow" / "vision_msgs"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('vision_msgs hidden by the test')\n")
    ns = f"/novm_{os.getpid()}_{random.randrange(1 << 20)}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", QVL_ROS_CACHE=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qvl_ros.node", "--ros-args", "-r", f"__ns:={ns}", "-p", f"model.path:={tiny_path}",
         "-p", "camera_topics:=[left/image_raw, right/image_raw]", "-p", "qos.reliability:=reliable",
         "-p", "detect.enabled:=true", "-p", "detect.classes:=[cup]", "-p", "model.warmup:=false",
         "-p", "sync.slop:=0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    context, executor = ros
    peer = Peer(context, ns)
    executor.add_node(peer)
    try:
        assert _wait(lambda: any("ready:" in line for line in lines), 90), "".join(lines)
        assert _wait(lambda: all(p.get_subscription_count() >= 1 for p in peer.pubs.values()), 20)
        for k in range(3):
            peer.publish_set(1_700_000_200 + k)
        assert _wait(lambda: len(peer.got(peer.features)) >= 3, 90), "".join(lines)
        off = [line for line in lines if "detections are off" in line]
        assert len(off) == 1 and "vision_msgs" in off[0], "".join(lines)
        assert all(peer.count_publishers(f"{ns}/{n}/detections") == 0 for n in CAMERAS)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "".join(lines)
    finally:
        executor.remove_node(peer)
        peer.destroy_node()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    reader.join(5)
    assert not any("Traceback" in line for line in lines), "".join(lines)


def test_the_tables_detection_bounds_are_the_libraries():
    from qvl_ros.core import params
    from qvl_ros.model import grounding

    assert (params.DETECT_MAX_CLASSES, params.DETECT_MAX_NAME, params.DETECT_MAX_DETECTIONS) == \
        (grounding.MAX_CLASSES, grounding.MAX_NAME_CHARS, grounding.MAX_DETECTIONS)
