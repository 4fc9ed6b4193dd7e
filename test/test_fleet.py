"""Sharded extraction (plan.json, shards, resume, `qvl-ros merge`) on a local Ray cluster and in one process.

The recording: three cameras at 10 Hz for 6 s in two inputs of different storage (mcap: two raw
cameras; sqlite3: one JPEG camera), recorded 4, 11 and 17 ms after their stamps, with a timeline
shifted so that every shard cut (whole seconds of recording time) falls between the recordings of
one tick's three frames: each cut is inside a synchronization window. Camera 1 skips a tick and
camera 2 has a corrupt JPEG next to cuts. Shards are 1 s, their overlap 0.8 s (with --reorder 0.2 a set
is completed about 0.4 s after its frames were recorded).

Oracle: one-process `qvl-ros extract` of the same inputs and options (itself checked against the
model in test_extract.py), compared message by message (topic, recording time, serialized bytes
in stored order, read back with rosbags), on the bag metadata, and file by file on the export.
Worker and driver deaths are real SIGKILLs of real processes; what the test waits for are files
the run writes, not time.
"""
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("rosbags")
ray = pytest.importorskip("ray")
yaml = pytest.importorskip("yaml")

from rosbags.rosbag2 import Reader  # noqa: E402

from qvl_ros.offline import extract as ex  # noqa: E402
from qvl_ros.offline import fleet  # noqa: E402
from qvl_ros.offline.merge import merge  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["/cam0/image_raw", "/cam1/image_raw", "/cam2/image_raw/compressed"]
T0 = 1_700_000_000.0 - 0.010  # tick 10k is stamped 10 ms before a whole second
TICKS = 60
OPTIONS = dict(batch=4, slop=0.02, prompt="What is in front of the robot?", caption=True, max_new_tokens=6,
               batch_window=0.5)
SHARD_ARGS = ["--shard-seconds", "1", "--overlap", "0.8"]


def _cli_options() -> list[str]:
    return ["--batch", "4", "--slop", "0.02", "--prompt", OPTIONS["prompt"], "--caption", "--max-new-tokens", "6",
            "--batch-window", "0.5", "--device", "cpu", "--progress", "lines", "--progress-interval", "0.5"]


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet_rec")
    raw = write_camera_bag(root / "raw", [CameraSpec(TOPICS[0], 120, 160, "rgb8", latency=0.004),
                                          CameraSpec(TOPICS[1], 112, 150, "bgr8", latency=0.011)],
                           ticks=TICKS, period=0.1, t0=T0, drop=[(1, 29)], storage="mcap", seed=3)
    jpeg = write_camera_bag(root / "jpeg", [CameraSpec(TOPICS[2], 128, 160, "jpeg", latency=0.017)],
                            ticks=TICKS, period=0.1, t0=T0, corrupt=[(0, 40)], storage="sqlite3", seed=4)
    return {"root": root, "inputs": [root / "raw", root / "jpeg"], "frames": raw + jpeg}


@pytest.fixture(scope="module")
def single(recording, tmp_path_factory):
    """The oracle: one process, one pass."""
    out = tmp_path_factory.mktemp("fleet_single")
    cfg = ex.ExtractConfig(inputs=recording["inputs"], output=out / "bag", topics=TOPICS, device="cpu",
                           export=out / "export", handle_signals=False, **OPTIONS)
    report = ex.extract(cfg, progress="none")
    assert report.error is None and report.sets_written > 40
    return {"bag": out / "bag", "export": out / "export", "sets": report.sets_written}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _config(recording, out, **kw):
    return ex.ExtractConfig(inputs=recording["inputs"], output=out, topics=TOPICS, device="cpu",
                            handle_signals=False, **dict(OPTIONS, **kw))


def _messages(bag: Path) -> list:
    with Reader(bag) as reader:
        return [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages()]


def _custom_data(bag: Path) -> dict:
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())
    return meta["rosbag2_bagfile_information"]["custom_data"]


def _export(directory: Path) -> dict:
    """Every export file's contents: index.json as bytes; each safetensors file's metadata, size and
    tensors as bytes. (Not the files' bytes: safetensors writes its metadata map in hash order,
    which differs between processes.)"""
    from safetensors import safe_open

    out = {}
    for p in sorted(directory.iterdir()):
        if p.suffix != ".safetensors":
            out[p.name] = p.read_bytes()
            continue
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                       for k in f.keys() for t in [f.get_tensor(k)]}
            out[p.name] = (f.metadata(), p.stat().st_size, tensors)
    return out


def _assert_same_as_single(merged: Path, single, export: Path | None = None) -> None:
    got, want = _messages(merged), _messages(single["bag"])
    assert [m[:2] for m in got] == [m[:2] for m in want]  # topics and recording times, in order
    assert got == want  # and every serialized byte, feature tensors included
    assert len([m for m in got if m[0] == "/qvl/features"]) == single["sets"]
    assert _custom_data(merged) == _custom_data(single["bag"])
    if export is not None:
        assert _export(export) == _export(single["export"])


def _markers(shards: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted(shards.glob("shard-*.json"))}


def _run_in_thread(cfg, opts):
    stream, result = io.StringIO(), {}

    def body():
        result["code"] = fleet.run_sharded(cfg, opts, stream=stream, progress="none")

    thread = threading.Thread(target=body)
    thread.start()
    return thread, stream, result


# --------------------------------------------------------------------------------------- tests
def test_the_cuts_fall_inside_synchronization_windows(recording):
    plan_cuts = [1_700_000_000_000_000_000 + k * 1_000_000_000 for k in range(6)]
    by_tick = [{f.tick: f for f in cam} for cam in recording["frames"]]
    for cut in plan_cuts:
        tick = (cut - int(T0 * 1e9)) // 100_000_000
        recorded = [cam[tick].record_ns for cam in by_tick if tick in cam]
        assert min(recorded) < cut <= max(recorded), (cut, recorded)


def test_two_ray_workers_over_mcap_and_sqlite3_merge_to_the_single_process_output(
        recording, single, ray_cluster, tmp_path):
    shards = tmp_path / "shards"
    cfg = _config(recording, shards, export=tmp_path / "merged-export")  # where merge writes it
    stream = io.StringIO()
    code = fleet.run_sharded(cfg, fleet.FleetOptions(workers=2, ray="local", shard_seconds=1, overlap=0.8),
                             stream=stream, progress="none")
    assert code == 0, stream.getvalue()
    plan = json.loads((shards / "plan.json").read_text())
    cuts = [s["start_ns"] for s in plan["shards"][1:]]
    assert cuts == [1_700_000_000_000_000_000 + k * 1_000_000_000 for k in range(6)]
    markers = _markers(shards)
    assert len(markers) == 7
    assert "seam" not in stream.getvalue(), stream.getvalue()
    assert len({m["pid"] for m in markers.values()}) == 2, stream.getvalue()  # both workers ran shards
    warmed = [m for m in markers.values() if m["read_start_ns"] > plan["start_ns"]]
    assert len(warmed) >= 4 and all(m["warmup_sets"] for m in warmed)  # seams checked on real overlaps
    assert not (tmp_path / "merged-export").exists()  # the shards keep their own exports until the merge
    assert all((shards / f"shard-{i:05d}.export" / "index.json").is_file() for i in range(7))
    counts = merge(shards, tmp_path / "merged")
    assert counts["sets"] == single["sets"] and counts["export"] == tmp_path / "merged-export"
    _assert_same_as_single(tmp_path / "merged", single, tmp_path / "merged-export")


def test_a_worker_killed_mid_shard_is_replaced_and_the_run_completes(recording, single, ray_cluster, tmp_path):
    shards = tmp_path / "shards"
    thread, stream, result = _run_in_thread(
        _config(recording, shards), fleet.FleetOptions(workers=2, ray="local", shard_seconds=1, overlap=0.8))
    killed = None
    while thread.is_alive() and killed is None:
        for marker in (shards / ".partial").glob("shard-*/EXTRACTION_INCOMPLETE"):
            try:
                text = marker.read_text()
            except FileNotFoundError:  # the shard finished in between
                continue
            found = re.search(r"\(pid (\d+)\)", text)
            if found:
                killed = (marker.parent.name, int(found.group(1)))
                os.kill(killed[1], signal.SIGKILL)
                break
        time.sleep(0.005)
    thread.join(timeout=600)
    assert killed is not None, "no shard was seen in progress"
    assert result.get("code") == 0, stream.getvalue()
    assert f"worker died during {killed[0]}" in stream.getvalue()
    markers = _markers(shards)
    assert len(markers) == 7
    assert markers[f"{killed[0]}.json"]["pid"] != killed[1]  # redone by the replacement
    merge(shards, tmp_path / "merged")
    _assert_same_as_single(tmp_path / "merged", single)


def _extract_cmd(recording, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qvl_ros.offline.cli", "extract", *map(str, recording["inputs"]),
            "--topics", *TOPICS, "--out", str(shards), *_cli_options(), *SHARD_ARGS, *extra]


def _start_until_a_shard_is_done(cmd: list[str], shards: Path, **popen) -> subprocess.Popen:
    """Start an extraction command; return once its first shard marker is there (or it ended)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    while proc.poll() is None and not list(shards.glob("shard-*.json")):
        time.sleep(0.005)
    return proc


def _wait_gone(pgid: int) -> None:
    for _ in range(2000):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes of group {pgid} outlived SIGKILL")


@pytest.mark.parametrize("where", ["ray", "this-process"])
def test_a_killed_driver_resumes_with_only_the_missing_shards(recording, single, tmp_path, where):
    shards = tmp_path / "shards"
    extra = ["--ray", "--workers", "2"] if where == "ray" else ["--workers", "1"]
    cmd = _extract_cmd(recording, shards, *extra)
    proc = _start_until_a_shard_is_done(cmd, shards, start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_gone(proc.pid)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in shards.glob("shard-*.json")}
    assert 1 <= len(before) < 7, (len(before), proc.stderr.read())

    refused = subprocess.run([sys.executable, "-m", "qvl_ros.offline.cli", "merge", str(shards), "--out",
                              str(tmp_path / "early")], capture_output=True, text=True)
    assert refused.returncode == 2 and "not done" in refused.stderr
    assert not (tmp_path / "early").exists()

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming {shards}: {len(before)} of 7 shards done, {7 - len(before)} to run" in again.stderr
    assert f"7 of 7 shards done ({7 - len(before)} in this run)" in again.stderr
    for name, (ino, mtime, data) in before.items():  # finished shards were not redone
        path = shards / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) == (ino, mtime, data)
    merged = subprocess.run([sys.executable, "-m", "qvl_ros.offline.cli", "merge", str(shards), "--out",
                             str(tmp_path / "merged")], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    _assert_same_as_single(tmp_path / "merged", single)

    # The same directory with other options: refused, and nothing is touched.
    other = _extract_cmd(recording, shards, "--workers", "1")
    other[other.index("--prompt") + 1] = "Is the way clear?"
    changed = subprocess.run(other, capture_output=True, text=True)
    assert changed.returncode == 2
    assert "prompt" in changed.stderr and "--force" in changed.stderr
    assert "'What is in front of the robot?' in the plan, 'Is the way clear?' now" in changed.stderr
    assert len(_markers(shards)) == 7


def test_a_command_joins_a_running_cluster_by_address_and_its_driver_never_imports_torch(
        recording, single, ray_cluster, tmp_path):
    """`--ray HOST:PORT` as a fleet job runs it: the driver plans and schedules without loading torch
    (the import trace of its process has no torch), the worker runs every shard, and when the command
    has exited the cluster has all its CPUs back."""
    from qvl_ros.model import default_tiny_checkpoint

    address = ray.get_runtime_context().gcs_address
    shards = tmp_path / "shards"
    cmd = _extract_cmd(recording, shards, "--ray", address, "--workers", "1", "--model", str(default_tiny_checkpoint()))
    run = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"ray: joining {address}" in run.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert {"ray", "qvl_ros.offline.fleet", "rosbags.rosbag2"} <= imported  # the trace is there
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert len({m["pid"] for m in _markers(shards).values()} - {None}) == 1 and len(_markers(shards)) == 7
    for _ in range(1000):  # the job's worker is released once its driver has gone
        if ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU"):
            break
        time.sleep(0.01)
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU") == 2
    merge(shards, tmp_path / "merged")
    _assert_same_as_single(tmp_path / "merged", single)


def test_workers_that_cannot_fit_on_the_cluster_are_refused(recording, ray_cluster, tmp_path):
    address = ray.get_runtime_context().gcs_address
    run = subprocess.run(_extract_cmd(recording, tmp_path / "shards", "--ray", address, "--workers", "2",
                                      "--gpus-per-worker", "1"), capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "--gpus-per-worker 1: the cluster has 0 GPUs in all, so no worker could ever start" in run.stderr
    assert "Traceback" not in run.stderr and not list((tmp_path / "shards").glob("shard-*"))


def test_an_address_where_nothing_answers_is_a_prompt_error(recording, tmp_path):
    import socket

    with socket.socket() as free:  # a port nothing listens on once this is closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run = subprocess.run(_extract_cmd(recording, tmp_path / "shards", "--ray", f"127.0.0.1:{port}"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert f"--ray 127.0.0.1:{port}: nothing answers there (Connection refused)" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("how", ["SIGTERM to the driver", "Ctrl-C to the process group"])
def test_a_signal_stops_a_ray_run_cleanly_and_a_rerun_completes(recording, single, tmp_path, how):
    """The driver's own handlers stay in place although ray.init installs one for SIGTERM: the run
    stops with a summary and the signal's exit status, the local cluster goes with it, and the
    same command finishes the run."""
    shards = tmp_path / "shards"
    cmd = _extract_cmd(recording, shards, "--ray", "--workers", "2")
    proc = _start_until_a_shard_is_done(cmd, shards, start_new_session=True)
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    done = len(_markers(shards))
    if done < 7:  # the usual case: stopped with shards left
        assert proc.returncode == (143 if how.startswith("SIGTERM") else 130), err
        assert f"{done} of 7 shards done" in err and "rerun the same command" in err, err
        assert "Traceback" not in err and "failed" not in err, err
    _wait_gone(proc.pid)  # the local cluster it started is gone too
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"7 of 7 shards done ({7 - done} in this run)" in again.stderr
    merge(shards, tmp_path / "merged")
    _assert_same_as_single(tmp_path / "merged", single)


def test_force_and_merge_are_refused_while_a_run_works_in_the_directory(recording, single, tmp_path):
    """A run stopped (SIGSTOP) after its first shard still holds the directory: `--force` deletes
    nothing and `merge` writes nothing; once it has finished, `--force` starts over."""
    shards = tmp_path / "shards"
    cmd = _extract_cmd(recording, shards, "--workers", "1")
    proc = _start_until_a_shard_is_done(cmd, shards)
    proc.send_signal(signal.SIGSTOP)
    try:
        before = sorted(p.name for p in shards.iterdir())
        forced = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
        refused = subprocess.run([sys.executable, "-m", "qvl_ros.offline.cli", "merge", str(shards), "--out",
                                  str(tmp_path / "early")], capture_output=True, text=True)
        assert sorted(p.name for p in shards.iterdir()) == before
    finally:
        proc.send_signal(signal.SIGCONT)
    assert forced.returncode == 2 and f"another run or merge is working in {shards}" in forced.stderr, forced.stderr
    assert refused.returncode == 2 and f"another run or merge is working in {shards}" in refused.stderr
    assert not (tmp_path / "early").exists()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    again = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
    assert again.returncode == 0 and "7 of 7 shards done (7 in this run)" in again.stderr, again.stderr
    merge(shards, tmp_path / "merged")
    _assert_same_as_single(tmp_path / "merged", single)


def _silent_camera_run(tmp_path, ticks: int, silent: range, seed: int):
    """Two cameras, camera 1 silent over the ticks ``silent``: one pass, then a sharded run in this
    process (1 s shards, 0.3 s overlap). Returns (the sharded run's output, its exit status, sets
    of one pass)."""
    topics = TOPICS[:2]
    rec = tmp_path / "rec"
    write_camera_bag(rec, [CameraSpec(topics[0], 64, 96, "rgb8", latency=0.004),
                           CameraSpec(topics[1], 72, 100, "bgr8", latency=0.011)],
                     ticks=ticks, period=0.1, t0=1_700_000_000.0, drop=[(1, t) for t in silent], seed=seed)
    common = dict(inputs=[rec], topics=topics, device="cpu", handle_signals=False, batch=3, slop=0.02,
                  batch_window=1.0, features=["vision"])
    report = ex.extract(ex.ExtractConfig(output=tmp_path / "single", **common), progress="none")
    stream = io.StringIO()
    code = fleet.run_sharded(ex.ExtractConfig(output=tmp_path / "shards", **common),
                             fleet.FleetOptions(workers=1, shard_seconds=1, overlap=0.3), stream=stream,
                             progress="none")
    return stream.getvalue(), code, report.sets_written


def _assert_merged_is_one_pass(tmp_path, sets: int) -> None:
    merge(tmp_path / "shards", tmp_path / "merged")
    assert _messages(tmp_path / "merged") == _messages(tmp_path / "single")
    assert len(_messages(tmp_path / "merged")) == sets


def test_a_seam_without_sets_in_the_overlap_is_redone_with_a_wider_one(tmp_path):
    """Camera 1 is silent from 1.7 s to 2.3 s: the overlap before the cut at 2 s holds no set, so
    that shard is redone reading further back, and the result is still one pass's."""
    out, code, sets = _silent_camera_run(tmp_path, 40, range(17, 24), seed=5)
    assert code == 0, out
    assert "seam before shard-00002: no synchronized set was completed in the overlap; redoing it with 1.2 s" in out
    assert _markers(tmp_path / "shards")["shard-00002.json"]["overlap_ns"] == 1_200_000_000
    _assert_merged_is_one_pass(tmp_path, sets)


def test_a_run_stopped_between_its_last_shard_and_the_seam_check_finishes_it_when_rerun(tmp_path, monkeypatch):
    """A Ctrl-C that lands after the last shard's marker and before the seam check (the recording
    of the test above, whose seam before shard-00002 fails): the rerun runs the seam check, redoes
    that shard, and the merge gives one pass's bag."""
    real_check = fleet.seam_failures

    def interrupted_once(root, plan):
        if not fleet.pending_shards(root, plan) and not interrupted_once.done:
            interrupted_once.done = True
            raise KeyboardInterrupt  # the second Ctrl-C of a user, right there
        return real_check(root, plan)

    interrupted_once.done = False
    monkeypatch.setattr(fleet, "seam_failures", interrupted_once)
    out, code, sets = _silent_camera_run(tmp_path, 40, range(17, 24), seed=5)
    assert interrupted_once.done, out
    assert code == 130 and "4 of 4 shards done" in out and "redoing" not in out
    assert "rerun the same command to check them" in out and "merge into one bag" not in out
    monkeypatch.setattr(fleet, "seam_failures", real_check)
    common = dict(inputs=[tmp_path / "rec"], topics=TOPICS[:2], device="cpu", handle_signals=False, batch=3,
                  slop=0.02, batch_window=1.0, features=["vision"])
    stream = io.StringIO()
    again = fleet.run_sharded(ex.ExtractConfig(output=tmp_path / "shards", **common),
                              fleet.FleetOptions(workers=1, shard_seconds=1, overlap=0.3), stream=stream,
                              progress="none")
    assert again == 0, stream.getvalue()
    assert "seam before shard-00002: no synchronized set was completed in the overlap; redoing it with 1.2 s" \
        in stream.getvalue()
    assert "4 of 4 shards done (" in stream.getvalue()
    _assert_merged_is_one_pass(tmp_path, sets)


def test_a_camera_silent_over_whole_shards_settles_every_seam_and_matches_one_pass(tmp_path):
    """Camera 1 is silent from 0.8 s to 3.2 s: shards 1 and 2 own no set, and the shard after the
    gap must read back past it. Its overlap grows from the widened one (0.3, 1.2, then to the
    run's start), and the seam check passes over the shards that own no set."""
    out, code, sets = _silent_camera_run(tmp_path, 50, range(8, 32), seed=6)
    assert code == 0, out
    plan = json.loads((tmp_path / "shards" / "plan.json").read_text())
    markers = _markers(tmp_path / "shards")
    assert [markers[f"shard-{i:05d}.json"]["sets"] == 0 for i in range(5)] == [False, True, True, False, False]
    assert "redoing it with 1.2 s" in out
    assert markers["shard-00003.json"]["read_start_ns"] == plan["start_ns"]  # read back past the gap
    _assert_merged_is_one_pass(tmp_path, sets)


def test_a_model_or_input_rewritten_at_the_same_size_is_refused_and_mixed_devices_do_not_merge(tmp_path):
    """Resume compares every model file and every input file by size and content fingerprint: a
    weight byte changed in place, or a recording's metadata edited at the same length, is named.
    Shards computed with another dtype (a resume on a GPU worker, say) are refused by merge."""
    import shutil

    from qvl_ros.model import default_tiny_checkpoint

    model = tmp_path / "model"
    shutil.copytree(default_tiny_checkpoint(), model)
    rec = tmp_path / "rec"
    write_camera_bag(rec, [CameraSpec(TOPICS[0], 64, 96, "rgb8", latency=0.004),
                           CameraSpec(TOPICS[1], 72, 100, "bgr8", latency=0.011)],
                     ticks=25, period=0.1, t0=1_700_000_000.0, seed=7)
    cfg = ex.ExtractConfig(inputs=[rec], output=tmp_path / "shards", topics=TOPICS[:2], model=str(model),
                           device="cpu", handle_signals=False, batch=3, slop=0.02, batch_window=1.0,
                           features=["vision"])
    opts = fleet.FleetOptions(workers=1, shard_seconds=1)
    assert fleet.run_sharded(cfg, opts, stream=io.StringIO(), progress="none") == 0

    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ex.ExtractError, match=r"model\.files\.model\.safetensors: \[1765920, '[0-9a-f]{64}'\] in the "
                                              r"plan, \[1765920, '[0-9a-f]{64}'\] now.*--force"):
        fleet.run_sharded(cfg, opts, stream=io.StringIO(), progress="none")
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    meta = rec / "metadata.yaml"
    meta.write_text(meta.read_text().replace("ros_distro: rosbags", "ros_distro: rosbagz"))
    with pytest.raises(ex.ExtractError, match=r"inputs\[0\]\.files\.metadata\.yaml: \[\d+, '[0-9a-f]{64}'\] in the plan"):
        fleet.run_sharded(cfg, opts, stream=io.StringIO(), progress="none")
    meta.write_text(meta.read_text().replace("ros_distro: rosbagz", "ros_distro: rosbags"))
    assert fleet.run_sharded(cfg, opts, stream=io.StringIO(), progress="none") == 0  # the same run again

    marker = tmp_path / "shards" / "shard-00001.json"
    assert json.loads(marker.read_text())["dtype"] == "float32"
    marker.write_text(marker.read_text().replace('"dtype":"float32"', '"dtype":"bfloat16"'))
    with pytest.raises(ex.ExtractError, match=r"different devices or dtypes \(cpu bfloat16, cpu float32\)"):
        merge(tmp_path / "shards", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_shard_options_without_a_sharded_run_or_without_a_batch_grid_are_refused(recording, tmp_path):
    plain = [sys.executable, "-m", "qvl_ros.offline.cli", "extract", *map(str, recording["inputs"]), "--topics",
             *TOPICS, "--out", str(tmp_path / "out"), "--shard-seconds", "60", "--gpus-per-worker", "1"]
    run = subprocess.run(plain, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "--gpus-per-worker, --shard-seconds: options of a sharded run, which needs --workers N" in run.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ex.ExtractError, match="--batch-window 0 cannot be sharded"):
        fleet.run_sharded(_config(recording, tmp_path / "shards", batch_window=0.0), fleet.FleetOptions(workers=1),
                          stream=io.StringIO(), progress="none")
    assert not (tmp_path / "shards").exists()


def test_ctrl_c_keeps_the_finished_shards_and_a_rerun_completes(recording, single, tmp_path):
    shards = tmp_path / "shards"
    cmd = _extract_cmd(recording, shards, "--workers", "1")
    proc = _start_until_a_shard_is_done(cmd, shards)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    done = len(_markers(shards))
    if done < 7:  # the usual case: interrupted with shards left
        assert proc.returncode == 130, err
        assert f"rerun the same command to finish the other {7 - done} shard" in err
        assert "Traceback" not in err
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"7 of 7 shards done ({7 - done} in this run)" in again.stderr
    assert not list((shards / ".partial").iterdir())  # what the interrupted shard left is gone
    merge(shards, tmp_path / "merged")
    _assert_same_as_single(tmp_path / "merged", single)
