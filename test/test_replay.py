"""Replay equals live: a recorded bag played into the running node gives what extraction of the
same bag gives, with the same parameter file, on both model families.

The player publishes each recorded camera message at its recorded time: ``/clock`` set to the
recording time, then the message (sensor_msgs/Image, reliable QoS), and it waits for the node to
have taken the frame before the next one (the node's own counters, no sleeps), so the node runs on
the bag's clock (``use_sim_time``) and nothing is dropped. The node is started with rclpy's
``--params-file`` on a file that extraction reads with ``--params-file`` too. Oracle: the two
outputs (rosbags reads the extraction's bag; the node's messages are received over DDS).

The one inherent difference: at the end of a recording extraction flushes the sets the
synchronizer still holds (approximate_time may wait for a frame that would tighten the last
set), while the live node keeps waiting for that frame. So the node's sets are extraction's
sets, in order, possibly without the last ones.
"""
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from polling import wait_for

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("qvl_ros.msg")
pytest.importorskip("rosbags")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rosbags.highlevel import AnyReader  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from qvl_ros.core.stamps import stamp_ns  # noqa: E402
from qvl_ros.model import save_tiny_checkpoint  # noqa: E402
from qvl_ros.msg import Caption, VisionFeatures  # noqa: E402
from qvl_ros.offline import extract as ex  # noqa: E402
from qvl_ros.ros.feature_msgs import time_msg  # noqa: E402
from qvl_ros.ros.node import QvlNode  # noqa: E402
from qvl_ros.ros.tensor_msg import features_to_numpy  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

TOPICS = ["/replay/a/image_raw", "/replay/b/image_raw"]
PARAMS = """\
/**/qvl_node:
  ros__parameters:
    camera_topics: [{topics}]
    qos: {{reliability: reliable, depth: 100}}
    batch: {{max_size: 2, queue_depth: 64}}
    caption: {{enabled: true, max_new_tokens: 4}}
    prompt: What moves?
    model: {{path: {model}, warmup: false}}
"""


def _wait(predicate, timeout=30.0):
    return wait_for(predicate, timeout, period=0.005)


def _image(msg):
    out = Image()
    out.header.stamp = time_msg(stamp_ns(msg.header.stamp))
    out.header.frame_id = msg.header.frame_id
    out.height, out.width, out.encoding, out.step = msg.height, msg.width, msg.encoding, msg.step
    out.is_bigendian = msg.is_bigendian
    out.data = bytes(msg.data)
    return out


def _play_into_node(bag: Path, params: Path, ns: str):
    """Start qvl_node on the parameter file with sim time, play the bag, return (features, captions)."""
    context = rclpy.Context()
    rclpy.init(context=context, args=[])
    executor = SingleThreadedExecutor(context=context)
    node = QvlNode(context=context, namespace=ns,
                   cli_args=["--ros-args", "--params-file", str(params), "-p", "use_sim_time:=true"])
    player = Node("player", context=context, namespace=ns)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    clock = player.create_publisher(Clock, "/clock", reliable)
    pubs = {t: player.create_publisher(Image, t, reliable) for t in TOPICS}
    features, captions = [], []
    player.create_subscription(VisionFeatures, f"{ns}/features", features.append, reliable)
    player.create_subscription(Caption, f"{ns}/caption", captions.append, reliable)
    for n in (node, player):
        executor.add_node(n)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        assert _wait(lambda: all(p.get_subscription_count() >= 1 for p in pubs.values())
                     and player.count_publishers(f"{ns}/features") >= 1 and clock.get_subscription_count() >= 1)

        def taken():
            s = node.pipeline_stats()
            return sum(s["sync"]["received"]) + sum(c["invalid"] for c in s["monitor"]["cameras"])

        with AnyReader([bag]) as reader:
            played = 0
            for conn, rec_ns, raw in reader.messages():
                clock.publish(Clock(clock=time_msg(rec_ns)))  # the bag's time, then its message
                assert _wait(lambda: node.get_clock().now().nanoseconds == rec_ns)
                pubs[conn.topic].publish(_image(reader.deserialize(raw, conn.msgtype)))
                played += 1
                assert _wait(lambda: taken() == played), node.pipeline_stats()
        assert _wait(lambda: node.wait_idle(0.05) and len(features) == node.pipeline_stats()["monitor"]["published"]
                     and len(captions) == len(features))
        stats = node.pipeline_stats()
        assert stats["batch"]["drops"]["queue_full"] == 0 and stats["monitor"]["model_errors"] == 0
        return list(features), list(captions)
    finally:
        executor.shutdown(timeout_sec=2.0)
        for n in (node, player):
            n.destroy_node()
        rclpy.try_shutdown(context=context)
        spin.join(5)


def _extract(bag: Path, params: Path, out: Path):
    code = ex.main([str(bag), "--out", str(out), "--params-file", str(params), "--device", "cpu",
                    "--progress", "none"])
    assert code == 0
    with AnyReader([out]) as reader:
        msgs = [(c.topic, reader.deserialize(raw, c.msgtype)) for c, _, raw in reader.messages()]
    return [m for t, m in msgs if t == "/qvl/features"], [m for t, m in msgs if t == "/qvl/caption"]


def _stamps(msg):
    return tuple(stamp_ns(s) for s in msg.camera_stamps)


def _offline_arrays(msg):
    return {t.name: np.frombuffer(bytes(t.data), dtype="<f4").reshape([int(d) for d in t.shape]) for t in msg.tensors}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_a_bag_played_into_the_node_gives_what_extraction_gives(family, tmp_path):
    model = save_tiny_checkpoint(tmp_path / family, family=family, seed=0)
    bag = tmp_path / "bag"
    write_camera_bag(bag, [CameraSpec(TOPICS[0], 56, 84, "rgb8", latency=0.004),
                           CameraSpec(TOPICS[1], 64, 72, "bgr8", latency=0.009)],
                     ticks=7, period=0.1, t0=1_700_000_000.0, drop=[(1, 3)], storage="mcap", seed=4)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.format(topics=", ".join(TOPICS), model=model))

    live, live_captions = _play_into_node(bag, params, f"/replay{os.getpid()}_{family}")
    offline, offline_captions = _extract(bag, params, tmp_path / "out")

    assert len(offline) == 6  # 7 ticks, camera b skips one
    assert 0 < len(live) <= len(offline) and len(offline) - len(live) <= 1  # the end of the bag (module doc)
    assert [_stamps(m) for m in live] == [_stamps(m) for m in offline[:len(live)]]
    for a, b, ca, cb in zip(live, offline, live_captions, offline_captions):
        assert (a.model, a.prompt, list(a.camera_names)) == (b.model, b.prompt, list(b.camera_names))
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        theirs = _offline_arrays(b)
        for name, array in features_to_numpy(a).items():
            np.testing.assert_allclose(array, theirs[name], rtol=0, atol=1e-6)
        assert [(r.source, r.start, r.count) for r in a.hidden_rows] == \
            [(r.source, r.start, r.count) for r in b.hidden_rows]
        assert _stamps(ca) == _stamps(a) and _stamps(cb) == _stamps(b)
        assert ca.text == cb.text
