"""`qvl-ros extract --detect`: detections per set and camera in the output bag and the export.

The recording: two raw cameras of different sizes (rgb8, bgr8) at 10 Hz, written here with
rosbags. Oracles: the frames and headers the recording was written with (pixels as generated,
headers read back from the input bag with rosbags) and `model.detect` through the public API on
those frames, in batches of the same composition. The output bag is read with rosbags from the
definitions stored in it (vision_msgs' included), the export with `load_features`; a sharded run
(this process, two shards) merged by `qvl-ros merge` holds the same detections, byte for byte.

The checkpoint is the tiny random Qwen2.5-VL of seed 3, whose constrained answers on these frames
hold detections (seed 0 answers `[]`); a test checks that there are some to compare.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("rosbags")
pytest.importorskip("llguidance")

from rosbags.highlevel import AnyReader  # noqa: E402

from qvl_ros.model import BatchedQwenVL, save_tiny_checkpoint  # noqa: E402
from qvl_ros.offline import extract as ex  # noqa: E402
from qvl_ros.offline import fleet  # noqa: E402
from qvl_ros.offline.export import load_features  # noqa: E402
from qvl_ros.offline.merge import merge  # noqa: E402
from qvl_ros.ros.detection_msgs import find_vision_msgs_dir  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

pytestmark = [pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"),
    pytest.mark.skipif(find_vision_msgs_dir() is None,
                       reason="vision_msgs definitions not installed (no share/vision_msgs/msg on AMENT_PREFIX_PATH)")]

TOPICS = ["/front/image_raw", "/left/image_raw"]
NAMES = ["front", "left"]
TICKS = 10
BATCH = 4
CLASSES = ["cup", "chair"]
MOST = 3


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    frames = write_camera_bag(root / "rec", [CameraSpec(TOPICS[0], 64, 96, "rgb8", latency=0.004),
                                             CameraSpec(TOPICS[1], 72, 100, "bgr8", latency=0.011)],
                              ticks=TICKS, period=0.1, t0=1_700_000_000.0, storage="mcap", seed=2)
    headers = {}  # (topic, stamp ns) -> frame_id, as recorded
    with AnyReader([root / "rec"]) as reader:
        for c, _, raw in reader.messages():
            h = reader.deserialize(raw, c.msgtype).header
            headers[(c.topic, h.stamp.sec * 1_000_000_000 + h.stamp.nanosec)] = h.frame_id
    return {"path": root / "rec", "frames": frames, "headers": headers}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-seed3", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return BatchedQwenVL.from_pretrained(checkpoint, device="cpu")


def _config(recording, checkpoint, out, **kw):
    base = dict(inputs=[recording["path"]], output=out, topics=TOPICS, model=str(checkpoint), device="cpu",
                batch=BATCH, slop=0.02, policy="max_sets", features=["vision"], handle_signals=False, batch_window=0.4,
                detect_classes=CLASSES, detect_max=MOST)
    base.update(kw)
    return ex.ExtractConfig(**base)


@pytest.fixture(scope="module")
def run(recording, checkpoint, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "features"
    report = ex.extract(_config(recording, checkpoint, out, export=out.parent / "arrays"), progress="none",
                        model=model)
    return {"report": report, "out": out, "export": out.parent / "arrays"}


@pytest.fixture(scope="module")
def oracle(recording, model):
    return _oracle(recording, model, CLASSES)


def _oracle(recording, model, target, ticks=range(TICKS)):
    """Per set (one per tick, all ticks complete): per camera (stamp, CameraDetections) of
    model.detect on the generated pixels, in the extraction's batches: 4 sets, never across a 0.4 s
    window of recording time; with max_sets a set is born when its last frame is recorded."""
    frames = recording["frames"]
    births = {t: max(cam[t].record_ns for cam in frames) for t in ticks}
    batches, batch = [], []
    for t in ticks:
        if batch and (len(batch) == BATCH or births[t] // 400_000_000 != births[batch[-1]] // 400_000_000):
            batches.append(batch)
            batch = []
        batch.append(t)
    batches.append(batch)
    out = []
    for ticks in batches:
        images = [[torch.from_numpy(np.array(cam[t].rgb)).permute(2, 0, 1).contiguous() for cam in frames]
                  for t in ticks]
        dets = model.detect(images, target, constrained=True, max_detections=MOST)
        out += [[(frames[k][t].stamp_ns, dets[i][k]) for k in range(len(frames))] for i, t in enumerate(ticks)]
    return out


def _messages(path):
    with AnyReader([Path(path)]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        msgs = [(c.topic, t, reader.deserialize(raw, c.msgtype), bytes(raw)) for c, t, raw in reader.messages()]
    return types, msgs


def _ns(t):
    return t.sec * 1_000_000_000 + t.nanosec


def test_detection_arrays_equal_the_library_with_the_input_headers(recording, run, oracle):
    report = run["report"]
    assert report.error is None and report.sets_written == TICKS
    types, msgs = _messages(run["out"])
    assert types == {"/qvl/features": "qvl_ros/msg/VisionFeatures",
                     "/qvl/front/detections": "vision_msgs/msg/Detection2DArray",
                     "/qvl/left/detections": "vision_msgs/msg/Detection2DArray"}
    per_camera = {name: [(t, m) for topic, t, m, _ in msgs if topic == f"/qvl/{name}/detections"] for name in NAMES}
    features = [(t, m) for topic, t, m, _ in msgs if topic == "/qvl/features"]
    total = 0
    for k, (name, topic) in enumerate(zip(NAMES, TOPICS)):
        got = per_camera[name]
        assert len(got) == len(oracle) == report.sets_written
        for (t, arr), (ft, feat), want in zip(got, features, oracle):
            stamp, cam = want[k]
            assert t == ft == max(s for s, _ in want)  # recorded at the set's stamp, as its features
            assert _ns(arr.header.stamp) == stamp == _ns(feat.inputs[k].header.stamp)
            assert arr.header.frame_id == recording["headers"][(topic, stamp)]
            assert len(arr.detections) == len(cam.detections)
            for i, (d, lib) in enumerate(zip(arr.detections, cam.detections)):
                assert (_ns(d.header.stamp), d.header.frame_id, d.id) == (stamp, arr.header.frame_id, str(i))
                assert [r.hypothesis.class_id for r in d.results] == [lib.label]
                assert lib.label in CLASSES
                assert math.isclose(d.results[0].hypothesis.score, lib.score, rel_tol=1e-6)
                cx, cy, sx, sy = d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.size_x, d.bbox.size_y
                assert np.allclose([cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2], lib.box, rtol=0, atol=1e-4)
            total += len(cam.detections)
    assert total > 0, "the checkpoint answered [] everywhere: nothing to compare"
    assert report.detections_written == 2 * TICKS and report.objects_detected == total


def test_a_free_text_query_gives_the_library_labels(recording, checkpoint, model, tmp_path):
    query = "the cup on the table"
    report = ex.extract(_config(recording, checkpoint, tmp_path / "out", detect_classes=None, detect_query=query),
                        progress="none", model=model)
    assert report.error is None
    want = _oracle(recording, model, query)
    _, msgs = _messages(tmp_path / "out")
    for k, name in enumerate(NAMES):
        got = [m for topic, _, m, _ in msgs if topic == f"/qvl/{name}/detections"]
        assert [[d.results[0].hypothesis.class_id for d in m.detections] for m in got] == \
            [[d.label for d in cams[k][1].detections] for cams in want]
    meta = yaml.safe_load((tmp_path / "out" / "metadata.yaml").read_text())
    assert meta["rosbag2_bagfile_information"]["custom_data"]["qvl_ros.detect_query"] == query


def test_clips_are_detected_on_the_frame_they_end_at(recording, checkpoint, model, tmp_path):
    """With clips of 2 frames, each set's detections are those of its matched (newest) frames, with
    their headers; the first tick has no full clip yet and gives no set."""
    report = ex.extract(_config(recording, checkpoint, tmp_path / "out", clip_frames=2), progress="none", model=model)
    assert report.error is None and report.sets_written == TICKS - 1
    want = _oracle(recording, model, CLASSES, ticks=range(1, TICKS))
    _, msgs = _messages(tmp_path / "out")
    for k, name in enumerate(NAMES):
        got = [m for topic, _, m, _ in msgs if topic == f"/qvl/{name}/detections"]
        assert [_ns(m.header.stamp) for m in got] == [cams[k][0] for cams in want]
        assert [[(d.results[0].hypothesis.class_id, d.bbox.center.position.x, d.bbox.size_y) for d in m.detections]
                for m in got] == \
            [[(d.label, (d.box[0] + d.box[2]) / 2, d.box[3] - d.box[1]) for d in cams[k][1].detections]
             for cams in want]


def test_export_arrays_equal_the_library(run, oracle):
    feats = load_features(run["export"])
    assert feats["stamp_ns"].tolist() == [max(s for s, _ in want) for want in oracle]
    for k, name in enumerate(NAMES):
        boxes, scores, sets = (feats[f"detections/{name}/{w}"] for w in ("boxes", "scores", "set"))
        want = [(i, d) for i, cams in enumerate(oracle) for d in cams[k][1].detections]
        assert boxes.dtype == scores.dtype == torch.float32 and sets.dtype == torch.int64
        assert boxes.shape == (len(want), 4)
        assert sets.tolist() == [i for i, _ in want]
        assert feats[f"detections/{name}/labels"] == [d.label for _, d in want]
        assert torch.equal(boxes, torch.tensor([d.box for _, d in want], dtype=torch.float32).reshape(-1, 4))
        assert torch.allclose(scores, torch.tensor([d.score for _, d in want], dtype=torch.float32), rtol=1e-6)


def test_sharded_run_and_merge_carry_the_detections(recording, checkpoint, run, tmp_path):
    stream = io.StringIO()
    code = fleet.run_sharded(_config(recording, checkpoint, tmp_path / "shards", export=tmp_path / "arrays"),
                             fleet.FleetOptions(workers=1, shard_seconds=0.8, overlap=0.3), stream=stream,
                             progress="none")
    assert code == 0, stream.getvalue()
    assert len(list((tmp_path / "shards").glob("shard-*.json"))) == 2
    merge(tmp_path / "shards", tmp_path / "merged")
    _, one = _messages(run["out"])
    _, merged = _messages(tmp_path / "merged")
    assert [(topic, t, raw) for topic, t, _, raw in merged] == [(topic, t, raw) for topic, t, _, raw in one]
    a, b = load_features(run["export"]), load_features(tmp_path / "arrays")
    for name in NAMES:
        for w in ("boxes", "scores", "set"):
            assert torch.equal(a[f"detections/{name}/{w}"], b[f"detections/{name}/{w}"])
        assert a[f"detections/{name}/labels"] == b[f"detections/{name}/labels"]


@pytest.mark.parametrize("argv, reason", [
    (["--detect", "cup,,chair"], "a class name is empty"),
    (["--detect", ",".join(f"c{i}" for i in range(65))], "65 class names; at most 64"),
    (["--detect", "x" * 129], "has 129 characters (at most 128)"),
    (["--detect", "cup,cup"], "a class name is given twice"),
    (["--detect", "cup\x07"], "holds a control character"),
    (["--detect", "<|box_start|>"], "special-token markers"),
    (["--detect", "cup", "--detect-query", "a red cup"], "not both"),
    (["--detect-query", "   "], "--detect-query: the query is empty"),
    (["--detect", "cup", "--detect-max", "0"], "--detect-max must be a finite integer >= 1 and at most 100"),
    (["--detect", "cup", "--detect-max", "101"], "--detect-max must be a finite integer >= 1 and at most 100"),
])
def test_bad_detect_options_are_refused_with_a_reason(recording, tmp_path, capsys, argv, reason):
    code = ex.main([str(recording["path"]), "--topics", *TOPICS, "--out", str(tmp_path / "out"),
                    "--progress", "none", *argv])
    assert code == ex.EXIT_USAGE
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_detect_without_vision_msgs_is_refused_before_the_model_loads(recording, tmp_path, monkeypatch):
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    with pytest.raises(ex.ExtractError, match="vision_msgs message definitions"):
        ex.extract(_config(recording, tmp_path / "no-such-model", tmp_path / "out"), progress="none")
    assert not (tmp_path / "out").exists()
