"""`qvl-ros extract` when things go wrong: killed, crashed, out of disk, given bad options or a
damaged recording. Outputs are read back with rosbags; the recordings are written here.

Frames are 28x28 (one merged patch per image) and the model is the bundled tiny one, so that
sets are cheap; the damaged-chunk recording uses 320x240 frames to get many small mcap chunks.
"""
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("rosbags")

from rosbags.highlevel import AnyReader  # noqa: E402

from qvl_ros.offline import extract as ex  # noqa: E402
from qvl_ros.offline.output_guard import INCOMPLETE_MARKER  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
TOPICS = ["/a/image_raw", "/b/image_raw"]


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    specs = [CameraSpec(TOPICS[0], 28, 28, "rgb8"), CameraSpec(TOPICS[1], 28, 28, "bgr8", latency=0.008)]
    write_camera_bag(root / "bag", specs, ticks=300, period=0.1, t0=T0, storage="mcap")
    big = [CameraSpec(TOPICS[0], 240, 320, "rgb8"), CameraSpec(TOPICS[1], 240, 320, "rgb8", latency=0.008)]
    write_camera_bag(root / "chunky", big, ticks=24, period=0.1, t0=T0, storage="mcap")
    return root


def _read(path):
    with AnyReader([Path(path)]) as reader:
        return [(c.topic, t) for c, t, _ in reader.messages()]


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def cli(capsys):
    """`qvl-ros extract ARGS` in this process: (exit code, stderr)."""
    def run(args):
        code = ex.main([str(a) for a in args])
        return _Result(code, capsys.readouterr().err)
    return run


def _base(rec, out, *extra):
    return [rec / "bag", "--out", out, "--topics", *TOPICS, "--device", "cpu", "--progress", "none", *extra]


def _run_until_sets(cmd, sets, timeout=180):
    """Start the CLI with a progress line per batch; return the process once `sets` are written."""
    proc = subprocess.Popen([sys.executable, "-m", "qvl_ros.extract", *map(str, cmd), "--progress", "lines",
                             "--progress-interval", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=os.environ.copy())
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline and seen < sets:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            if "| sets " in line:
                seen = int(line.split("| sets ")[1].split()[0])
    assert seen >= sets, f"only {seen} sets written"
    return proc


# ------------------------------------------------------------------------------ kill and crash
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSEGV"])
def test_killed_run_leaves_a_marked_output_that_force_replaces(rec, tmp_path, how, cli):
    out = tmp_path / "out"
    proc = _run_until_sets([rec / "bag", "--out", out, "--topics", *TOPICS, "--device", "cpu", "--batch", "2"], 4)
    proc.send_signal(getattr(signal, how))  # SIGSEGV: as a crash in native code would end it
    proc.wait(30)
    assert proc.returncode == -getattr(signal, how)
    marker = out / INCOMPLETE_MARKER
    assert marker.is_file() and "--force" in marker.read_text()
    res = cli(_base(rec, out, "--end", "+1.05"))
    assert res.returncode == 2 and "exists" in res.stderr and "--force" in res.stderr
    res = cli(_base(rec, out, "--end", "+1.05", "--force"))
    assert res.returncode == 0, res.stderr
    assert not marker.exists() and sorted(p.name for p in out.iterdir()) == ["metadata.yaml", "out.mcap"]
    assert len(_read(out)) == 11  # ticks 0..10


class FailingModel:
    """The real model, failing on its third call (as a driver error or OOM would)."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.name, self.device = model.name, model.device

    def encode(self, images, prompts):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("device lost")
        return self.model.encode(images, prompts)


def test_error_mid_run_keeps_every_finished_set_in_a_valid_bag(rec, tmp_path):
    from qvl_ros.model import BatchedQwenVL, default_tiny_checkpoint

    model = FailingModel(BatchedQwenVL.from_pretrained(default_tiny_checkpoint(), device="cpu"))
    out = tmp_path / "out"
    report = ex.extract(ex.ExtractConfig(inputs=[rec / "bag"], output=out, topics=TOPICS, device="cpu", batch=2),
                        progress="none", model=model)
    assert report.error == "RuntimeError: device lost" and report.output_complete
    # batches 1 and 2 were computed before the failure (batch 1 written when 2 was computed,
    # batch 2 written in the clean-up)
    assert report.sets_written == 4
    assert len(_read(out)) == 4 and not (out / INCOMPLETE_MARKER).exists()
    assert "error: RuntimeError: device lost" in ex.format_summary(report)


# ------------------------------------------------------------------------------ full disk
_TMPFS_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from pathlib import Path
    mnt, args = Path(sys.argv[1]), sys.argv[2:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    res = subprocess.run([sys.executable, "-m", "qvl_ros.extract", *args, "--out", str(mnt / "out"),
                          "--progress", "none"], capture_output=True, text=True)
    from rosbags.highlevel import AnyReader
    try:
        with AnyReader([mnt / "out"]) as r:
            n = sum(1 for _ in r.messages())
    except Exception as exc:
        n = repr(exc)
    print(json.dumps({"rc": res.returncode, "stderr": res.stderr, "messages": n,
                      "files": sorted(p.name for p in (mnt / "out").iterdir())}))
""")


def test_full_disk_stops_cleanly_with_a_valid_bag(rec, tmp_path):
    """A real 4 MiB tmpfs (mounted in a user+mount namespace) for the output."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "in_namespace.py"
    script.write_text(_TMPFS_SCRIPT)
    args = [rec / "bag", "--topics", *TOPICS, "--device", "cpu", "--batch", "4"]
    res = subprocess.run(["unshare", "-r", "-m", sys.executable, str(script), str(mnt), *map(str, args)],
                         capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    err = got["stderr"]
    assert got["rc"] == 1, err
    assert "disk full" in err and "Traceback" not in err
    written = int(err.split("stopped by an error: ")[1].split(" set")[0])
    assert 0 < written < 300 and written % 4 == 0
    assert got["messages"] == written  # all of them, in a bag rosbags reads
    assert got["files"] == ["metadata.yaml", "out.mcap"]


# ------------------------------------------------------------------------------ checked up front
@pytest.mark.parametrize("extra, words", [
    (["--reorder", "1e300"], "--reorder must be a finite number"),
    (["--slop", "inf"], "--slop must be a finite number"),
    (["--slop", "nan"], "--slop must be a finite number"),
    (["--slop", "-0.1"], "--slop must be"),
    (["--batch", "0"], "--batch must be"),
    (["--queue-size", "-3"], "--queue-size must be"),
    (["--shard-mb", "0"], "--shard-mb must be"),
    (["--max-input-pixels", "-1"], "--max-input-pixels must be"),
    (["--progress-interval", "nan"], "--progress-interval must be"),
    (["--start", "nan"], "not a finite number"),
    (["--start", "+1e9"], "after the end of the recordings"),
    (["--end", "1000"], "before the start of the recordings"),
])
def test_bad_options_exit_2_with_a_message_before_the_model_loads(rec, tmp_path, extra, words, cli):
    # The model path does not exist: the option must be reported first, the model never reached.
    res = cli(_base(rec, tmp_path / "out", "--model", tmp_path / "no_model", *extra))
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "cannot load model" not in res.stderr and not (tmp_path / "out").exists()


def test_unwritable_output_exits_2_before_the_model_loads(rec, tmp_path, cli):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker / "out", Path("/proc/qvl_out")):
        res = cli(_base(rec, out, "--model", tmp_path / "no_model"))
        assert res.returncode == 2 and "--out" in res.stderr and "cannot be created" in res.stderr, res.stderr


def test_sigint_while_the_model_loads_exits_130_without_a_traceback(rec, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "qvl_ros.extract", *map(str, _base(rec, out)[:-2]),
                             "--progress", "lines"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=os.environ.copy())
    line = ""
    while not line.startswith("loading model"):
        line = proc.stderr.readline()
        assert line, "no 'loading model' line"
    proc.send_signal(signal.SIGINT)
    err = line + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert ("interrupted before extraction started" in err) or ("interrupted by SIGINT" in err)
    assert not out.exists() or not (out / INCOMPLETE_MARKER).exists()


def test_no_set_is_an_error_unless_allowed(rec, tmp_path, cli):
    empty = tmp_path / "empty_topic"
    write_camera_bag(empty, [CameraSpec(TOPICS[0], 28, 28), CameraSpec(TOPICS[1], 28, 28)], ticks=3, t0=T0,
                     drop=[(1, t) for t in range(3)])
    res = cli([empty, "--out", tmp_path / "o1", "--topics", *TOPICS, "--device", "cpu", "--progress", "none"])
    assert res.returncode == 2 and "/b/image_raw has no messages" in res.stderr, res.stderr
    res = cli([empty, "--out", tmp_path / "o1", "--topics", *TOPICS, "--device", "cpu", "--progress", "none",
                "--allow-empty"])
    assert res.returncode == 0 and _read(tmp_path / "o1") == []
    # stamps that never match (slop 0 with jittered stamps): the run finishes without a set
    res = cli(_base(rec, tmp_path / "o2", "--slop", "0", "--end", "+2"))
    assert res.returncode == 3 and "no set was produced" in res.stderr, res.stderr
    assert _read(tmp_path / "o2") == []
    res = cli(_base(rec, tmp_path / "o3", "--start", "+1e6", "--allow-empty"))
    assert res.returncode == 0 and _read(tmp_path / "o3") == []


# ------------------------------------------------------------------------------ damaged input
def test_damaged_mcap_chunk_is_reported_with_its_position_and_skipped(rec, tmp_path):
    from rosbags.rosbag2 import Reader

    bag = tmp_path / "chunky"
    shutil.copytree(rec / "chunky", bag)
    with Reader(bag) as reader:
        storage = reader.storage.storages[0]
        chunks = [(c.chunk_start_offset, c.message_start_time, c.message_end_time) for c in storage.chunks]
    assert len(chunks) >= 6
    offset, first_ns, last_ns = chunks[2]
    mcap = bag / "chunky.mcap"
    data = bytearray(mcap.read_bytes())
    # Chunk record: opcode, length, start, end, uncompressed size, crc, compression, records.
    # Damage the first message record's length inside the chunk.
    comp_len = struct.unpack_from("<I", data, offset + 37)[0]
    records = offset + 49 + comp_len
    assert data[records] == 0x05  # a message record
    struct.pack_into("<Q", data, records + 1, 2 ** 62)
    mcap.write_bytes(bytes(data))

    out = tmp_path / "out"
    report = ex.extract(ex.ExtractConfig(inputs=[bag], output=out, topics=TOPICS, device="cpu", batch=4,
                                         max_pixels=28 * 28 * 4), progress="none")
    assert report.error is None and report.reached_end
    assert len(report.damaged) == 1 and f"chunk at byte {offset}" in report.damaged[0]
    assert "chunky.mcap" in report.damaged[0]
    sets = len(_read(out))
    in_chunk = round((last_ns - first_ns) / 0.1e9) + 1  # ticks with a frame in the damaged chunk
    assert 24 - in_chunk - 1 <= sets < 24  # only the damaged chunk's sets are missing
    assert f"input damage, skipped: {report.damaged[0]}" in ex.format_summary(report)


def test_max_input_pixels_option_fails_large_frames(rec, tmp_path):
    report = ex.extract(ex.ExtractConfig(inputs=[rec / "bag"], output=tmp_path / "o", topics=TOPICS, device="cpu",
                                         end="+0.45", max_input_pixels=28 * 27), progress="none")
    assert report.sets_written == 0 and sum(c.failed for c in report.cameras) == 10
    assert all("max_input_pixels 756" in reason for _, _, reason in report.failures)
