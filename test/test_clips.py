"""Clips of K frames per camera: the ring buffers (qvl_ros.core.clips), the node over real DDS and
extraction from a bag.

The clip rule is checked against the streams the tests publish or record: camera n's clip is its
matched frame and the stride-th, 2*stride-th, ... frames published before it. Features are
compared with `BatchedQwenVL.encode` on the same frames (from the published messages / the
recorded pixels), with each clip's frame rate (K - 1) / (last stamp - first stamp).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from polling import wait_for
import torch

from qvl_ros.core.clips import ClipAssembler, ClipBuffer, clip_fps
from qvl_ros.core.synchronizer import Synchronizer

MS = 1_000_000


def fps_of(stamps):
    return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) * 1e-9)


def expected_clip(published, stamp, frames, stride):
    """From one camera's published stamps (in order): the clip ending at `stamp`."""
    i = published.index(stamp)
    first = i - (frames - 1) * stride
    return tuple(published[first:i + 1:stride]) if first >= 0 else None


# ----------------------------------------------------------------------------- ring buffers
def test_clip_takes_every_stride_th_frame_ending_at_the_matched_one():
    buf = ClipBuffer(frames=3, stride=2, lag=3)
    assert buf.capacity == 2 * 2 + 3
    stamps = [100 * MS * i for i in range(1, 11)]
    for s in stamps:
        assert buf.push(s, f"f{s}") is None
        assert len(buf) <= buf.capacity
    assert buf.clip(stamps[-1]) == ((stamps[5], stamps[7], stamps[9]), [f"f{stamps[5]}", f"f{stamps[7]}",
                                                                          f"f{stamps[9]}"])
    assert buf.clip(stamps[-2]) == (tuple(stamps[4:9:2]), [f"f{s}" for s in stamps[4:9:2]])
    assert buf.clip(stamps[2]) is None  # evicted: older than the ring holds
    assert buf.clip(stamps[-1] + 1) is None  # never pushed


def test_restarts_on_gap_out_of_order_and_size_change():
    buf = ClipBuffer(frames=2, stride=1, lag=2)
    frame = torch.zeros(3, 28, 28, dtype=torch.uint8)
    for i in range(3):
        buf.push(i * 100 * MS, frame)
    assert buf.push(3 * 100 * MS + 50 * MS, frame) is None  # 1.5 periods: within the 2-frame span
    assert buf.push(700 * MS, frame) == "gap"  # 3.5 periods > K * stride = 2 periods
    assert buf.clip(700 * MS) is None and buf.clip(350 * MS) is not None  # older clips stay
    assert buf.push(800 * MS, frame) is None and buf.clip(800 * MS) is not None
    assert buf.push(800 * MS, frame) == "out_of_order"
    assert buf.push(900 * MS, torch.zeros(3, 28, 56, dtype=torch.uint8)) == "size_change"
    assert buf.restarts == {"gap": 1, "out_of_order": 1, "size_change": 1}


def test_clip_fps_and_frames_out_of_order():
    assert clip_fps([0, 100 * MS, 200 * MS]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="frames out of order"):
        clip_fps([0, 200 * MS, 100 * MS])
    with pytest.raises(ValueError, match="out of order"):
        clip_fps([0, 0])
    with pytest.raises(ValueError, match="at least 2"):
        clip_fps([0])
    with pytest.raises(ValueError, match="at least 2 frames"):
        ClipBuffer(frames=1)


def test_memory_bounded_with_one_camera_at_ten_times_the_rate():
    """Three cameras, one at 100 Hz and two at 10 Hz, through the real synchronizer: every ring
    stays within its bound, and once the history is there every set gets its full clip."""
    K, S, Q = 4, 3, 10
    sync = Synchronizer(3, 4 * MS, Q)
    clips = ClipAssembler(3, K, S, lag=Q)
    rng = np.random.default_rng(0)
    published = [[], [], []]
    events = []
    for tick in range(600):  # 6 s at 100 Hz
        t = 1_000 * MS + tick * 10 * MS
        events.append((t + int(rng.integers(0, MS)), 0))
        if tick % 10 == 0:
            for k in (1, 2):
                events.append((t + int(rng.integers(0, 2 * MS)), k))
    events.sort()
    made, emitted = [], []
    for stamp, k in events:
        published[k].append(stamp)
        clips.push(k, stamp, ("frame", k, stamp))
        for s in sync.add(k, stamp, ("frame", k, stamp)):
            emitted.append(s)
            c = clips.assemble(s)
            if c is not None:
                made.append(c)
        assert max(clips.stats()["held"]) <= clips.stats()["capacity"] == (K - 1) * S + Q
    st = clips.stats()
    assert st["held"][0] == st["capacity"]  # the fast camera fills its ring and stays there
    # sets without a clip: exactly those where a camera had fewer than (K - 1) * S frames before
    lacking = [s for s in emitted if any(published[k].index(s.stamps[k]) < (K - 1) * S for k in range(3))]
    assert st["incomplete"] == len(lacking) > 0
    assert len(made) == len(emitted) - len(lacking) >= 20
    for c in made:
        for k in range(3):
            assert c.clip_stamps[k] == expected_clip(published[k], c.stamps[k], K, S)
            assert [f[2] for f in c.items[k]] == list(c.clip_stamps[k])
            assert c.fps[k] == pytest.approx(fps_of(c.clip_stamps[k]))
    assert st["restarts"] == [{"gap": 0, "out_of_order": 0, "size_change": 0}] * 3


# ----------------------------------------------------------------------------- the node over DDS
def _fill(msg, rgb, stamp):
    from qvl_ros.ros.feature_msgs import time_msg

    h, w, _ = rgb.shape
    msg.header.stamp = time_msg(stamp)
    msg.height, msg.width, msg.encoding, msg.step = h, w, "rgb8", 3 * w
    msg.data = rgb.tobytes()
    return msg


@pytest.fixture(scope="module")
def tiny_model():
    from qvl_ros.model import BatchedQwenVL, default_tiny_checkpoint

    return BatchedQwenVL.from_pretrained(default_tiny_checkpoint(), device="cpu")


def _wait(pred, timeout=20.0):
    return wait_for(pred, timeout)


def test_node_publishes_clips_equal_to_encode_on_the_same_frames(tiny_model):
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("qvl_ros.msg")
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from qvl_ros.msg import VisionFeatures
    from qvl_ros.ros.feature_msgs import stamp_ns
    from qvl_ros.ros.node import QvlNode
    from qvl_ros.ros.tensor_msg import features_to_numpy

    K, S, Q = 3, 2, 10
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=[])
    ex = SingleThreadedExecutor(context=ctx)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    ns = f"/clips{os.getpid()}"
    node = QvlNode(model=tiny_model, context=ctx, namespace=ns, parameter_overrides=[
        Parameter("camera_topics", value=["slow/image_raw", "fast/image_raw"]),
        Parameter("video.frames", value=K), Parameter("video.stride", value=S),
        Parameter("sync.slop", value=0.004), Parameter("sync.queue_size", value=Q),
        Parameter("qos.reliability", value="reliable"), Parameter("qos.depth", value=100),
        Parameter("diagnostics.period", value=0.2), Parameter("batch.max_size", value=2),
        Parameter("batch.queue_depth", value=64)])
    io = Node("clip_io", context=ctx, namespace=ns)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    pubs = [io.create_publisher(Image, t, reliable) for t in ("slow/image_raw", "fast/image_raw")]
    got, diags = [], []
    io.create_subscription(VisionFeatures, "features", got.append, 100)
    io.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 100)
    for n in (node, io):
        ex.add_node(n)
    try:
        assert _wait(lambda: all(io.count_subscribers(p.topic_name) >= 1 for p in pubs)
                     and io.count_publishers(ns + "/features") >= 1)
        time.sleep(0.3)
        rng = np.random.default_rng(1)
        frames = [{}, {}]  # stamp -> (H, W, 3) rgb, per camera
        published = [[], []]
        for tick in range(140):  # the fast camera at 10x the slow one's rate
            t = 5_000 * MS + tick * 10 * MS
            for k in ((0, 1) if tick % 10 == 0 else (1,)):
                stamp = t + (MS if k == 1 else 0)
                rgb = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
                frames[k][stamp] = rgb
                published[k].append(stamp)
                pubs[k].publish(_fill(Image(), rgb, stamp))
            time.sleep(0.004)
        # 14 slow frames -> up to 14 sets (the synchronizer's policy may hold the last one back);
        # the first (K - 1) * S lack the slow camera's history

        def published_all():
            st = node.pipeline_stats()
            return (st["sync"]["sets"] >= 12 and node.wait_idle(0.1)
                    and len(got) == st["sync"]["sets"] - st["clips"]["incomplete"])

        assert _wait(published_all), (len(got), node.pipeline_stats())
        stats = node.pipeline_stats()["clips"]
        assert stats["incomplete"] == (K - 1) * S
        assert max(stats["held"]) <= stats["capacity"] == (K - 1) * S + Q
        assert _wait(lambda: any(kv.key == "sets without a full clip" and kv.value == str((K - 1) * S)
                                 for a in list(diags) for st in a.status for kv in st.values))
        for msg in got:
            assert msg.clip_frames == K and len(msg.clip_stamps) == 2 * K
            clip_stamps = [[stamp_ns(t) for t in msg.clip_stamps[n * K:(n + 1) * K]] for n in range(2)]
            clips, rates = [], []
            for n in range(2):
                assert tuple(clip_stamps[n]) == expected_clip(published[n], stamp_ns(msg.camera_stamps[n]), K, S)
                clips.append(torch.stack([torch.from_numpy(frames[n][s]).permute(2, 0, 1) for s in clip_stamps[n]]))
                rates.append(fps_of(clip_stamps[n]))
            ref = tiny_model.encode([clips], [msg.prompt], fps=[rates])
            arrays = features_to_numpy(msg)
            for n, name in enumerate(("slow", "fast")):
                np.testing.assert_allclose(arrays[f"vision/{name}"], ref.vision[0][n].numpy(), rtol=1e-4, atol=1e-4)
            n_real = int(ref.attention_mask[0].sum())
            np.testing.assert_allclose(arrays["hidden"], ref.hidden[0, -n_real:].numpy(), rtol=1e-4, atol=1e-4)
    finally:
        ex.shutdown(timeout_sec=2.0)
        for n in (node, io):
            n.destroy_node()
        rclpy.try_shutdown(context=ctx)
        spin.join(5)


# ----------------------------------------------------------------------------- extraction
def test_extraction_clips_equal_encode_and_are_deterministic(tiny_model, tmp_path):
    pytest.importorskip("rosbags")
    from rosbags.highlevel import AnyReader

    from qvl_ros.offline import extract as ex
    from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag

    K, S, ticks = 3, 2, 24
    topics = ["/a/image_raw", "/b/image_raw"]
    drop = [(1, t) for t in range(12, 18)]  # camera b: a gap of 7 periods, longer than its clip span K*S = 6
    rec = write_camera_bag(tmp_path / "rec", [CameraSpec(topics[0], 56, 84), CameraSpec(topics[1], 84, 56)],
                           ticks=ticks, period=0.1, drop=drop, storage="mcap", seed=3)
    cfg = dict(inputs=[tmp_path / "rec"], topics=topics, device="cpu", batch=3, slop=0.02,
               clip_frames=K, clip_stride=S)
    report = ex.extract(ex.ExtractConfig(output=tmp_path / "out1", **cfg), progress="none", model=tiny_model)
    again = ex.extract(ex.ExtractConfig(output=tmp_path / "out2", **cfg), progress="none", model=tiny_model)
    assert report.error is None and again.error is None
    assert report.clip_restarts == {"a": {}, "b": {"gap": 1}}
    stamps = [[f.stamp_ns for f in cam] for cam in rec]
    pixels = [{f.stamp_ns: f.rgb for f in cam} for cam in rec]

    def read(path):
        with AnyReader([path]) as r:
            return [(r.deserialize(raw, c.msgtype), bytes(raw)) for c, _, raw in r.messages()]

    out = read(tmp_path / "out1")
    assert [raw for _, raw in out] == [raw for _, raw in read(tmp_path / "out2")]  # deterministic
    assert len(out) == report.sets_written > 0
    # sets whose clip would reach back across camera b's gap (or before the start) are not written
    expected_sets = 0
    for tick in range(ticks):
        b_stamp = [s for s in stamps[1] if abs(s - stamps[0][tick]) < 20 * MS]
        if b_stamp:
            i = stamps[1].index(b_stamp[0])
            after_gap = all(stamps[1][j + 1] - stamps[1][j] < 300 * MS for j in range(i - (K - 1) * S, i)) \
                if i >= (K - 1) * S else False
            expected_sets += tick >= (K - 1) * S and after_gap
    assert report.sets_written == expected_sets
    for msg, _ in out:
        ns = lambda t: t.sec * 1_000_000_000 + t.nanosec  # noqa: E731
        assert msg.clip_frames == K
        clips, rates = [], []
        for n in range(2):
            cs = [ns(t) for t in msg.clip_stamps[n * K:(n + 1) * K]]
            assert tuple(cs) == expected_clip(stamps[n], ns(msg.camera_stamps[n]), K, S)
            clips.append(torch.stack([torch.from_numpy(pixels[n][s]).permute(2, 0, 1) for s in cs]))
            rates.append(fps_of(cs))
        ref = tiny_model.encode([clips], [msg.prompt], fps=[rates])
        for n, t in enumerate(msg.tensors[:2]):
            got = np.frombuffer(t.data.tobytes(), dtype="<f4").reshape(tuple(int(d) for d in t.shape))
            np.testing.assert_allclose(got, ref.vision[0][n].numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ex.ExtractError, match="clip-frames"):
        ex.extract(ex.ExtractConfig(output=tmp_path / "bad", **{**cfg, "clip_frames": 1}), progress="none",
                   model=tiny_model)


def test_ask_about_a_clip_set_uses_the_clips_frame_rate(tiny_model):
    """~/ask on a node with clips answers with the same model call as the feature stream: the
    clips ending at the newest set's frames, with their frame rate (10 Hz here). Qwen2.5-VL's
    time positions depend on that rate; the answer without it (the processor's default rate)
    differs, so the check can fail."""
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("qvl_ros.msg")
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from qvl_ros.ros.feature_msgs import stamp_ns
    from qvl_ros.ros.node import QvlNode
    from qvl_ros.srv import Ask

    K, ticks, prompt, tokens = 4, 6, "What moves?", 12
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=[])
    ex = SingleThreadedExecutor(context=ctx)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    ns = f"/askclips{os.getpid()}"
    topics = ["a/image_raw", "b/image_raw"]
    node = QvlNode(model=tiny_model, context=ctx, namespace=ns, parameter_overrides=[
        Parameter("camera_topics", value=topics), Parameter("video.frames", value=K),
        Parameter("sync.slop", value=0.004), Parameter("qos.reliability", value="reliable"),
        Parameter("qos.depth", value=100), Parameter("model.warmup", value=False)])
    io = Node("ask_io", context=ctx, namespace=ns)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    pubs = [io.create_publisher(Image, t, reliable) for t in topics]
    client = io.create_client(Ask, f"{ns}/qvl_node/ask")
    for n in (node, io):
        ex.add_node(n)
    try:
        assert _wait(lambda: all(io.count_subscribers(p.topic_name) >= 1 for p in pubs))
        assert client.wait_for_service(timeout_sec=20)
        rng = np.random.default_rng(2)
        frames = [{}, {}]
        for tick in range(ticks):
            for k in (0, 1):
                stamp = 7_000 * MS + tick * 100 * MS + k * MS
                frames[k][stamp] = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
                pubs[k].publish(_fill(Image(), frames[k][stamp], stamp))
        assert _wait(lambda: node.pipeline_stats()["sync"]["sets"] >= ticks - 1)
        future = client.call_async(Ask.Request(prompt=prompt, max_new_tokens=tokens))
        assert _wait(future.done, 60)
        res = future.result()
        assert res.success, res.message
        stamps = [stamp_ns(h.stamp) for h in res.camera_headers]
        assert stamps[1] - stamps[0] == MS and stamps[0] in frames[0]  # one tick's frames
        clips = [torch.stack([torch.from_numpy(frames[k][s]).permute(2, 0, 1)
                              for s in expected_clip(sorted(frames[k]), stamps[k], K, 1)]) for k in (0, 1)]
        rates = [fps_of(expected_clip(sorted(frames[k]), stamps[k], K, 1)) for k in (0, 1)]
        assert rates == pytest.approx([10.0, 10.0])
        want = tiny_model.generate([clips], [prompt], max_new_tokens=tokens, fps=[rates])[0]
        assert tiny_model.generate([clips], [prompt], max_new_tokens=tokens)[0] != want  # the rate matters
        assert res.text == want.replace("\x00", "")
    finally:
        ex.shutdown(timeout_sec=2.0)
        for n in (node, io):
            n.destroy_node()
        rclpy.try_shutdown(context=ctx)
        spin.join(5)
