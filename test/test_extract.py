"""Offline extraction (`qvl-ros extract`, qvl_ros.offline.extract) on recordings written here with rosbags.

The recording: three cameras at 10 Hz with jittered stamps, in two inputs of different storage
(mcap: two raw cameras, rgb8 and bgr8 of different sizes; sqlite3: one JPEG camera). Camera 1
skips tick 5 and camera 2's frame of tick 11 is a corrupt JPEG, so exactly the other 18 ticks
form synchronized sets. Oracles: the stamps the recording was written with, and
BatchedQwenVL.encode / encode_generate on the same frames decoded here with OpenCV, in batches
of the same composition. The output is read back with rosbags from the definitions stored in it.
"""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
pytest.importorskip("rosbags")

from rosbags.highlevel import AnyReader  # noqa: E402

from qvl_ros.offline import extract as ex  # noqa: E402
from qvl_ros.offline.bag_io import CameraBags, camera_names_for  # noqa: E402
from qvl_ros.offline.export import load_features  # noqa: E402
from qvl_ros.model import BatchedQwenVL, default_tiny_checkpoint  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
TICKS = 20
PERIOD = 0.1
T0 = 1_700_000_000.0
TOPICS = ["/cam0/image_raw", "/cam1/image_raw", "/cam2/image_raw/compressed"]
NAMES = ["cam0", "cam1", "cam2"]
DROPPED = (1, 5)  # camera 1 skips tick 5
CORRUPT = (2, 11)  # camera 2's JPEG of tick 11 is corrupt
BATCH = 4
PROMPT = "What is in front of the robot?"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    raw = write_camera_bag(root / "raw", [CameraSpec(TOPICS[0], 64, 96, "rgb8", latency=0.004),
                                          CameraSpec(TOPICS[1], 72, 100, "bgr8", latency=0.011)],
                           ticks=TICKS, period=PERIOD, t0=T0, drop=[DROPPED], storage="mcap", seed=0)
    jpeg = write_camera_bag(root / "jpeg", [CameraSpec(TOPICS[2], 84, 112, "jpeg", latency=0.017)],
                            ticks=TICKS, period=PERIOD, t0=T0, corrupt=[(0, CORRUPT[1])], storage="sqlite3",
                            seed=1, extra_topics=[("/chatter", "string")])
    frames = raw + jpeg  # per camera, in tick order
    by_tick = [{f.tick: f for f in cam} for cam in frames]
    good_ticks = [t for t in range(TICKS)
                  if all(t in cam and not cam[t].corrupt for cam in by_tick)]
    return {"root": root, "inputs": [root / "raw", root / "jpeg"], "frames": by_tick, "ticks": good_ticks}


@pytest.fixture(scope="module")
def model():
    return BatchedQwenVL.from_pretrained(default_tiny_checkpoint(), device="cpu")


def _config(recording, out, **kw):
    base = dict(inputs=recording["inputs"], output=out, topics=TOPICS, model=None, device="cpu",
                batch=BATCH, prompt=PROMPT, slop=0.02)
    base.update(kw)
    return ex.ExtractConfig(**base)


@pytest.fixture(scope="module")
def run(recording, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "features"
    export = out.parent / "arrays"
    report = ex.extract(_config(recording, out, export=export), progress="none")
    return {"report": report, "out": out, "export": export}


def _read_bag(path):
    """[(topic, bag time, message, raw bytes)] using only the definitions stored in the bag."""
    with AnyReader([Path(path)]) as reader:
        conns = {c.topic: c for c in reader.connections}
        out = [(c.topic, t, reader.deserialize(raw, c.msgtype), bytes(raw)) for c, t, raw in reader.messages()]
    return conns, out


def _ns(t):
    return t.sec * 1_000_000_000 + t.nanosec


def _tensor(ft):
    assert ft.dtype == "float32"
    values = np.frombuffer(ft.data.tobytes(), dtype="<f4").astype(np.float32)  # own, writable memory
    return torch.from_numpy(values.reshape(tuple(int(d) for d in ft.shape)))


def _decode(frame, spec_index, recording):
    """OpenCV decode of a recorded frame to a uint8 (3, H, W) RGB tensor."""
    data = np.frombuffer(frame.data, dtype=np.uint8)
    if spec_index == 2:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:
        h, w = frame.rgb.shape[:2]
        px = data.reshape(h, w, 3)
        rgb = px if spec_index == 0 else cv2.cvtColor(px, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous()


def _oracle_batches(recording, ticks, batch):
    frames = recording["frames"]
    sets = [[_decode(frames[k][t], k, recording) for k in range(3)] for t in ticks]
    return [sets[i:i + batch] for i in range(0, len(sets), batch)]


# --------------------------------------------------------------------------------------- tests
def test_one_message_per_synchronized_set_with_the_recorded_stamps(recording, run):
    report = run["report"]
    assert report.error is None and report.interrupted is None and report.reached_end
    conns, msgs = _read_bag(run["out"])
    assert list(conns) == ["/qvl/features"]
    ticks = recording["ticks"]
    assert len(ticks) == TICKS - 2
    assert len(msgs) == len(ticks) == report.sets_written
    frames = recording["frames"]
    for (topic, t, msg, _), tick in zip(msgs, ticks):
        expected = [frames[k][tick].stamp_ns for k in range(3)]
        assert [_ns(s) for s in msg.camera_stamps] == expected
        assert _ns(msg.header.stamp) == max(expected) == t  # bag time = set stamp
        assert list(msg.camera_names) == NAMES
        assert msg.prompt == PROMPT and msg.model == report.model
        assert [f.name for f in msg.tensors] == ["vision/cam0", "vision/cam1", "vision/cam2", "hidden"]


def test_features_equal_encode_on_the_same_frames(recording, run, model):
    _, msgs = _read_bag(run["out"])
    i = 0
    for batch in _oracle_batches(recording, recording["ticks"], BATCH):
        feats = model.encode(batch, [PROMPT] * len(batch))
        for b in range(len(batch)):
            got = {f.name: _tensor(f) for f in msgs[i][2].tensors}
            for n, name in enumerate(NAMES):
                torch.testing.assert_close(got[f"vision/{name}"], feats.vision[b][n], rtol=0, atol=0)
            real = int(feats.attention_mask[b].sum())
            torch.testing.assert_close(got["hidden"], feats.hidden[b, -real:], rtol=0, atol=0)
            i += 1
    assert i == len(msgs)
    # cameras of different sizes give different token counts
    counts = {_tensor(f).shape[0] for f in msgs[0][2].tensors[:3]}
    assert len(counts) > 1


def test_corrupt_frame_reported_and_skipped_and_drops_explained(recording, run):
    report = run["report"]
    cams = {c.name: c for c in report.cameras}
    assert [c.frames for c in report.cameras] == [TICKS, TICKS - 1, TICKS]
    assert all(c.used == len(recording["ticks"]) for c in report.cameras)
    assert [c.failed for c in report.cameras] == [0, 0, 1]
    # tick 5 (cam1 missing): cam0 and cam2 unmatched; tick 11 (cam2 corrupt): cam0 and cam1 unmatched
    assert cams["cam0"].dropped == {"unmatched": 2}
    assert cams["cam1"].dropped == {"unmatched": 1}
    assert cams["cam2"].dropped == {"unmatched": 1}
    assert all(c.pending == 0 for c in report.cameras) and report.sets_unwritten == 0
    (topic, stamp, reason), = report.failures
    assert topic == TOPICS[2] and stamp == recording["frames"][2][CORRUPT[1]].stamp_ns
    assert "jpeg" in reason
    text = ex.format_summary(report)
    assert "cannot decode jpeg" in text and "unmatched" in text
    assert f"{len(recording['ticks'])} sets written" in text


def test_output_is_a_valid_bag_with_stored_definitions(run):
    meta = (run["out"] / "metadata.yaml").read_text()
    assert "storage_identifier: mcap" in meta
    conns, msgs = _read_bag(run["out"])
    conn = conns["/qvl/features"]
    assert conn.msgtype == "qvl_ros/msg/VisionFeatures"
    assert "MSG: qvl_ros/FeatureTensor" in conn.msgdef.data
    # the stored hash is the one rosidl computes for our .msg files (when the build is present)
    install = Path(os.environ.get("QVL_INSTALL", ROOT / "install"))  # scripts/run.sh: the distribution's
    desc = install / "qvl_ros" / "share" / "qvl_ros" / "msg" / "VisionFeatures.json"
    if desc.exists():
        hashes = json.loads(desc.read_text())["type_hashes"]
        want = next(h["hash_string"] for h in hashes if h["type_name"] == "qvl_ros/msg/VisionFeatures")
        assert conn.digest == want
    try:  # the bytes are also what rclpy produces/consumes for the generated message
        from rclpy.serialization import deserialize_message

        from qvl_ros.msg import VisionFeatures
        from qvl_ros.ros.tensor_msg import features_to_numpy
    except ImportError:
        return
    first = deserialize_message(msgs[0][3], VisionFeatures)
    arrays = features_to_numpy(first)
    np.testing.assert_array_equal(arrays["vision/cam0"], _tensor(msgs[0][2].tensors[0]).numpy())


def test_export_arrays_match_the_bag(run):
    feats = load_features(run["export"])
    _, msgs = _read_bag(run["out"])
    assert feats["camera_names"] == NAMES and feats["topics"] == TOPICS and feats["prompt"] == PROMPT
    assert feats["stamp_ns"].tolist() == [t for _, t, _, _ in msgs]
    assert feats["camera_stamps_ns"].tolist() == [[_ns(s) for s in m.camera_stamps] for _, _, m, _ in msgs]
    for i, (_, _, m, _) in enumerate(msgs):
        for ft in m.tensors:
            assert torch.equal(feats[ft.name][i], _tensor(ft))
    assert feats["captions"] is None


def test_two_runs_are_identical_with_or_without_read_ahead(recording, run, tmp_path):
    # this time with the read-ahead thread (off by default on a CPU) and small export shards
    report = ex.extract(_config(recording, tmp_path / "again", prefetch=2, export=tmp_path / "arr", shard_mb=0.05),
                        progress="none")
    assert report.sets_written == run["report"].sets_written
    _, first = _read_bag(run["out"])
    _, second = _read_bag(tmp_path / "again")
    assert [(t, raw) for _, t, _, raw in first] == [(t, raw) for _, t, _, raw in second]
    index = json.loads((tmp_path / "arr" / "index.json").read_text())
    assert len(index["shards"]) > 1 and index["sets"] == report.sets_written
    a, b = load_features(run["export"]), load_features(tmp_path / "arr")
    for key in ("stamp_ns", "vision/cam0", "vision/cam2", "hidden"):
        assert torch.equal(a[key], b[key])


def test_captions_time_range_and_feature_selection(recording, model, tmp_path):
    # --start relative to the first recording time, --end absolute: ticks 2..9 (tick 5 has no set)
    start, end = "+0.15", f"{T0 + 9.5 * PERIOD:.3f}"
    report = ex.extract(_config(recording, tmp_path / "cap", caption=True, max_new_tokens=4, features=["vision"],
                                start=start, end=end, batch=3, export=tmp_path / "arr"), progress="none")
    ticks = [t for t in recording["ticks"] if 2 <= t <= 9]
    conns, msgs = _read_bag(tmp_path / "cap")
    assert set(conns) == {"/qvl/features", "/qvl/caption"}
    feats = [m for m in msgs if m[0] == "/qvl/features"]
    caps = [m for m in msgs if m[0] == "/qvl/caption"]
    assert len(feats) == len(caps) == len(ticks) == report.sets_written == report.captions_written
    texts = []
    for batch in _oracle_batches(recording, ticks, 3):
        _, t = model.encode_generate(batch, [PROMPT] * len(batch), max_new_tokens=4)
        texts += t
    assert [m.text for _, _, m, _ in caps] == texts
    for (_, tf, f, _), (_, tc, c, _) in zip(feats, caps):
        assert tf == tc and f.camera_stamps == c.camera_stamps
        assert [x.name for x in f.tensors] == ["vision/cam0", "vision/cam1", "vision/cam2"]
    assert load_features(tmp_path / "arr")["captions"] == texts


def test_sync_on_recording_times_and_no_set_hint(recording, tmp_path):
    frames = recording["frames"]
    report = ex.extract(_config(recording, tmp_path / "bagtime", stamps="bag", end="+0.35", features=["vision"],
                                camera_names=["front", "left", "right"]), progress="none")
    _, msgs = _read_bag(tmp_path / "bagtime")
    assert [[_ns(s) for s in m.camera_stamps] for _, _, m, _ in msgs] == \
        [[frames[k][t].record_ns for k in range(3)] for t in range(4)]
    assert [f.name for f in msgs[0][2].tensors] == ["vision/front", "vision/left", "vision/right"]
    # a slop below the cameras' stamp spread: frames but no set, and the summary says what to try
    report = ex.extract(_config(recording, tmp_path / "none", slop=0.0001, end="+0.35"), progress="none")
    assert report.sets_written == 0 and all(c.frames for c in report.cameras)
    assert "no synchronized set found" in ex.format_summary(report)
    assert _read_bag(tmp_path / "none")[1] == []


def test_rosbags_image_data_is_a_view_of_the_record(recording):
    with CameraBags(recording["inputs"], TOPICS) as bags:
        assert [c.short_type for c in bags.cameras] == ["Image", "Image", "CompressedImage"]
        k, _, raw = next(iter(bags.records()))
        msg = bags.deserialize(k, raw)
        assert isinstance(msg.data, np.ndarray) and msg.data.dtype == np.uint8
        assert np.shares_memory(msg.data, np.frombuffer(raw, dtype=np.uint8))
        # merged over both inputs in recording-time order
        times = [t for _, t, _ in bags.records()]
        assert times == sorted(times) and len(times) == 3 * TICKS - 1
    # a bare storage file works as an input too
    with CameraBags([recording["inputs"][0] / "raw.mcap"], TOPICS[:2]) as bags:
        assert [c.count for c in bags.cameras] == [TICKS, TICKS - 1]
        assert sum(1 for _ in bags.records()) == 2 * TICKS - 1


def test_camera_names_follow_the_node_rule():
    topics = ["/robot/front/image_raw/compressed", "/left/image_rect", "/a/cam/image_raw", "/b/cam/image_raw"]
    assert camera_names_for(topics) == ["front", "left", "a_cam", "b_cam"]
    assert camera_names_for(TOPICS) == NAMES
    assert camera_names_for(["/x/image", "/x/image/compressed"]) == ["x_0", "x_1"]


def test_progress_line_on_a_terminal():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ex.Progress(200, stream=stream)
    assert bar.mode == "bar"
    bar.update(50, 10, force=True)
    bar.finish(200, 40)
    text = stream.getvalue()
    assert text.startswith("\rframes 50/200 ( 25%) | sets 10 |") and "sets/s" in text and "ETA" in text
    assert text.endswith("\n") and "frames 200/200 (100%) | sets 40" in text


# ---------------------------------------------------------------------------------- error exits
def _cli(args, capsys):
    code = ex.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_error_exits(recording, tmp_path, capsys):
    inputs = recording["inputs"]
    out = tmp_path / "out"
    base = ["--out", out, "--topics", *TOPICS, "--device", "cpu", "--progress", "none"]

    code, err = _cli([tmp_path / "nope", *base], capsys)
    assert code == 2 and "input not found" in err and "nope" in err

    code, err = _cli([*inputs, "--out", out, "--topics", TOPICS[0], "/cam9/image_raw"], capsys)
    assert code == 2 and "/cam9/image_raw not found" in err and "/cam0/image_raw (Image)" in err

    code, err = _cli([*inputs, "--out", out, "--topics", TOPICS[0], "/chatter"], capsys)
    assert code == 2 and "/chatter" in err and "std_msgs/msg/String" in err and "expected" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 5}\n")
    code, err = _cli([broken, *base], capsys)
    assert code == 2 and "cannot read" in err and "broken" in err

    not_a_bag = tmp_path / "plain"
    not_a_bag.mkdir()
    code, err = _cli([not_a_bag, *base], capsys)
    assert code == 2 and "not a rosbag2 recording" in err

    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(b"\x89MCAP0\r\n" + b"\x00" * 20)
    code, err = _cli([garbage, *base], capsys)
    assert code == 2 and "cannot read" in err and "garbage.mcap" in err

    empty_model = tmp_path / "model"
    empty_model.mkdir()
    code, err = _cli([*inputs, *base, "--model", empty_model], capsys)
    assert code == 2 and "cannot load model" in err and "config.json" in err
    (empty_model / "config.json").write_text("{not json")
    code, err = _cli([*inputs, *base, "--model", empty_model], capsys)
    assert code == 2 and "cannot load model" in err
    code, err = _cli([*inputs, *base, "--model", tmp_path / "missing_model"], capsys)
    assert code == 2 and "cannot load model" in err and "no such directory" in err
    assert not out.exists()  # nothing is created before every check passed


def test_output_is_never_overwritten_without_force(recording, run, tmp_path, capsys):
    base = [*recording["inputs"], "--topics", *TOPICS, "--device", "cpu", "--progress", "none",
            "--end", "+0.35"]
    code, err = _cli([*base, "--out", run["out"]], capsys)
    assert code == 2 and "exists" in err and "--force" in err

    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    code, err = _cli([*base, "--out", stranger, "--force"], capsys)
    assert code == 2 and "refusing" in err and (stranger / "todo.txt").exists()

    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    code, err = _cli([*base, "--out", copy, "--force"], capsys)
    assert code == 0, err
    _, msgs = _read_bag(copy)
    assert len(msgs) == 4  # ticks 0..3 (recordings up to +0.35 s)
    code, err = _cli([*base, "--out", recording["inputs"][0], "--force"], capsys)
    assert code == 2 and "also an input" in err


# ---------------------------------------------------------------------------------- interrupts
@pytest.fixture(scope="module")
def long_recording(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    specs = [CameraSpec("/a/image_raw", 56, 56, "rgb8"), CameraSpec("/b/image_raw", 56, 56, "bgr8", latency=0.008),
             CameraSpec("/c/image_raw/compressed", 56, 56, "jpeg", latency=0.015)]
    frames = write_camera_bag(root / "bag", specs, ticks=400, period=PERIOD, t0=T0, storage="mcap")
    return {"path": root / "bag", "topics": [s.topic for s in specs], "frames": frames, "ticks": 400}


def _prefix_reference(long_recording, tmp_path, sets, batch):
    """The first `sets` sets of an uninterrupted run with the same batch size."""
    ref = tmp_path / "reference"
    end = f"{T0 + (sets - 0.5) * PERIOD:.3f}"
    ex.extract(ex.ExtractConfig(inputs=[long_recording["path"]], output=ref, topics=long_recording["topics"],
                                device="cpu", batch=batch, end=end), progress="none")
    return _read_bag(ref)[1]


def test_sigint_finishes_the_batch_in_flight_and_leaves_a_valid_bag(long_recording, tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "qvl_ros.extract", str(long_recording["path"]), "--out", str(out),
           "--topics", *long_recording["topics"], "--device", "cpu", "--batch", "2",
           "--progress", "lines", "--progress-interval", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=os.environ.copy())
    seen, lines = 0, []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if not ready:
                continue
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "| sets " in line:
                seen = int(line.split("| sets ")[1].split()[0])
                if seen >= 6:
                    proc.send_signal(signal.SIGINT)
                    break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines) + rest
    assert seen >= 6, err
    assert proc.returncode == 130, err
    assert "SIGINT: finishing the batch in flight" in err and "interrupted by SIGINT" in err
    _, msgs = _read_bag(out)
    assert seen <= len(msgs) < long_recording["ticks"]
    assert len(msgs) % 2 == 0  # whole batches only
    written = int(err.split("interrupted by SIGINT: ")[1].split(" set")[0])
    assert written == len(msgs)
    reference = _prefix_reference(long_recording, tmp_path, len(msgs), batch=2)
    assert [(t, raw) for _, t, _, raw in msgs] == [(t, raw) for _, t, _, raw in reference[:len(msgs)]]


def test_sigterm_in_process_stops_after_the_batch_and_closes_output_and_export(long_recording, tmp_path):
    sent = []

    def on_progress(report):
        if report.sets_written >= 4 and not sent:
            sent.append(report.sets_written)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    report = ex.extract(ex.ExtractConfig(inputs=[long_recording["path"]], output=tmp_path / "out",
                                         topics=long_recording["topics"], device="cpu", batch=2,
                                         export=tmp_path / "arr", prefetch=3),
                        on_progress=on_progress, progress="none")
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert report.interrupted == signal.SIGTERM and report.error is None
    # the signal arrived while batch 3 was computed (batch i+1 is computed before batch i is
    # written): batch 3 was finished and written, nothing after it
    assert sent == [4] and report.sets_written == 6
    assert not report.reached_end
    _, msgs = _read_bag(tmp_path / "out")
    assert len(msgs) == 6
    assert load_features(tmp_path / "arr")["stamp_ns"].tolist() == [t for _, t, _, _ in msgs]
    assert "interrupted by SIGTERM" in ex.format_summary(report)
    assert ex.EXIT_SIGNAL[signal.SIGTERM] == 143


def test_console_script_runs_the_subcommand(tmp_path):
    exe = shutil.which("qvl-ros")
    cmd = [exe] if exe else [sys.executable, "-m", "qvl_ros.offline.cli"]
    res = subprocess.run([*cmd, "extract", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--topics" in res.stdout and "--export" in res.stdout
    res = subprocess.run([*cmd, "extract", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--topics", "/x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "qvl-ros extract: error: input not found" in res.stderr


@pytest.mark.parametrize("shard_bytes", [1, 1 << 30], ids=["shard-per-set", "one-shard"])
def test_export_pads_rows_of_different_length_and_records_lengths(tmp_path, shard_bytes):
    from qvl_ros.offline.export import FeatureExporter

    exp = FeatureExporter(tmp_path / "arr", ["a"], ["/a/image"], "m", "p", ["vision", "hidden"], captions=True,
                          shard_bytes=shard_bytes)
    rows = [torch.arange(n * 2, dtype=torch.bfloat16).reshape(n, 2) for n in (3, 5, 3)]
    for i, r in enumerate(rows):
        exp.add([100 + i], [("vision/a", torch.ones(4, 2)), ("hidden", r)], caption=f"c{i}")
    exp.close()
    assert len(json.loads((tmp_path / "arr" / "index.json").read_text())["shards"]) == (3 if shard_bytes == 1 else 1)
    feats = load_features(tmp_path / "arr")
    assert feats["hidden"].dtype == torch.bfloat16 and feats["hidden"].shape == (3, 5, 2)
    assert feats["hidden:length"].tolist() == [3, 5, 3]
    for i, r in enumerate(rows):
        assert torch.equal(feats["hidden"][i, : r.shape[0]], r) and not feats["hidden"][i, r.shape[0]:].any()
    assert "vision/a:length" not in feats and feats["vision/a"].shape == (3, 4, 2)
    assert feats["stamp_ns"].tolist() == [100, 101, 102] and feats["captions"] == ["c0", "c1", "c2"]


def test_a_camera_with_frames_the_model_cannot_take_drops_them_as_invalid_and_the_run_goes_on(model, tmp_path,
                                                                                               capsys):
    """Camera c sends 28x6000 frames (aspect ratio over 200) for ticks 8-11, normal frames
    otherwise. Extraction drops those four frames as invalid under the node's reason key
    (``aspect_ratio``), writes every other tick's set and exits 0."""
    topics = ["/a/image_raw", "/b/image_raw", "/c/image_raw"]
    wide = range(8, 12)
    specs = [CameraSpec(topics[0], 56, 84), CameraSpec(topics[1], 56, 84, "bgr8"), CameraSpec(topics[2], 56, 84)]
    normal = write_camera_bag(tmp_path / "normal", specs, ticks=12 + 4, period=PERIOD, t0=T0, jitter=0,
                              drop=[(2, t) for t in wide], storage="mcap", seed=2)
    write_camera_bag(tmp_path / "wide", [CameraSpec(topics[2], 28, 6000)], ticks=16, period=PERIOD, t0=T0,
                     jitter=0, drop=[(0, t) for t in range(16) if t not in wide], storage="mcap", seed=3)
    out = tmp_path / "out"
    code = ex.main([str(tmp_path / "normal"), str(tmp_path / "wide"), "--out", str(out), "--topics", *topics,
                    "--device", "cpu", "--progress", "none", "--batch", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    with AnyReader([out]) as reader:
        stamps = [tuple(t.sec * 1_000_000_000 + t.nanosec for t in reader.deserialize(raw, c.msgtype).camera_stamps)
                  for c, _, raw in reader.messages()]
    a_stamps = [f.stamp_ns for f in normal[0]]
    assert stamps == [(a_stamps[t],) * 3 for t in range(16) if t not in wide]  # every other tick's set
    assert "aspect_ratio 4" in err and "has an aspect ratio over 200" in err
    report = ex.extract(ex.ExtractConfig(inputs=[tmp_path / "normal", tmp_path / "wide"], output=tmp_path / "o2",
                                         topics=topics, device="cpu", batch=3), progress="none", model=model)
    assert report.error is None and report.sets_written == 12
    assert [c.invalid for c in report.cameras] == [{}, {}, {"aspect_ratio": 4}]
    assert [c.failed for c in report.cameras] == [0, 0, 4]
