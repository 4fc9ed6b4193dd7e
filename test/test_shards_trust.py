"""`qvl-ros merge` and sharded runs against a shards directory someone tampered with.

One small sharded run (two cameras at 10 Hz for 2.5 s, 1 s shards, with --export) is made once;
each test works on a copy of it. Oracles: rosbags reads what was written (counts, messages);
the files around the shards directory are hashed (every file, link and directory of the
surrounding temporary tree) before and after each operation.

Findings reproduced (each failed before the change):
- a shard bag swapped for another, or a shard directory that is a link, merged with exit 0;
- a read error while merging left an output without its incomplete marker (looking finished);
- a marker that is a JSON list or a directory gave a raw traceback;
- resume deleted and overwrote files through links (``.partial``, temporary files, the lock);
- ``merge --force`` deleted any directory with an ``index.json`` that plan.json named.
"""
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rosbags")

from rosbags.rosbag2 import Reader  # noqa: E402

from qvl_ros.offline import extract as ex  # noqa: E402
from qvl_ros.offline import fleet  # noqa: E402
from qvl_ros.offline.merge import merge  # noqa: E402
from qvl_ros.offline.output_guard import INCOMPLETE_MARKER  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

TOPICS = ["/cam0/image_raw", "/cam1/image_raw"]
OPTS = fleet.FleetOptions(workers=1, shard_seconds=1)


def _config(rec: Path, shards: Path, export: Path, **kw) -> ex.ExtractConfig:
    return ex.ExtractConfig(inputs=[rec], output=shards, topics=TOPICS, device="cpu", handle_signals=False,
                            batch=3, slop=0.02, batch_window=1.0, features=["vision"], export=export, **kw)


def _messages(bag: Path) -> list:
    with Reader(bag) as reader:
        return [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished sharded run (3 shards) and its merge: the material every test copies."""
    root = tmp_path_factory.mktemp("trust_base")
    rec = root / "rec"
    write_camera_bag(rec, [CameraSpec(TOPICS[0], 64, 96, "rgb8", latency=0.004),
                           CameraSpec(TOPICS[1], 72, 100, "bgr8", latency=0.011)],
                     ticks=25, period=0.1, t0=1_700_000_000.0, seed=7)
    code = fleet.run_sharded(_config(rec, root / "shards", root / "export"), OPTS, stream=io.StringIO(),
                             progress="none")
    assert code == 0
    merge(root / "shards", root / "merged")
    return {"root": root, "rec": rec, "messages": _messages(root / "merged")}


@pytest.fixture
def case(base, tmp_path):
    """A copy of the run in a fresh tree: tmp/shards, tmp/merged (an earlier merge), tmp/export, and
    tmp/outside holding what a link might reach: a victim file, a shard-like directory, an
    export-like directory, a copy of a shard."""
    shutil.copytree(base["root"] / "shards", tmp_path / "shards", symlinks=True)
    shutil.copytree(base["root"] / "merged", tmp_path / "merged")
    shutil.copytree(base["root"] / "export", tmp_path / "export")
    (tmp_path / "shards" / ".lock").unlink(missing_ok=True)
    outside = tmp_path / "outside"
    (outside / "shard-00001").mkdir(parents=True)
    (outside / "shard-00001" / "keep.txt").write_text("not the tool's\n")
    (outside / "shard-00001.export").mkdir()
    (outside / "shard-00001.export" / "keep.txt").write_text("not the tool's either\n")
    (outside / "victim.txt").write_text("precious\n")
    labels = outside / "labels"
    labels.mkdir()
    (labels / "index.json").write_text(json.dumps({"format": "qvl_ros.features/1"}))
    (labels / "labels.json").write_text("{}")
    shutil.copytree(base["root"] / "shards" / "shard-00002", outside / "copy-of-shard-00002")
    plan = json.loads((tmp_path / "shards" / "plan.json").read_text())
    plan["export_dir"] = str(tmp_path / "export")
    (tmp_path / "shards" / "plan.json").write_text(json.dumps(plan))
    return {"tmp": tmp_path, "shards": tmp_path / "shards", "outside": outside, "rec": base["rec"]}


def _snapshot(tree: Path, skip: Path) -> dict:
    """Every entry under ``tree`` but inside ``skip`` (a real directory): kind and content."""
    seen = {}
    for top, dirs, files in os.walk(tree):
        top = Path(top)
        if top == skip and not skip.is_symlink():
            dirs[:] = []
            continue
        for name in dirs + files:
            p = top / name
            if p.is_symlink():
                seen[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                seen[str(p)] = ("dir",)
            else:
                seen[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return seen


# ------------------------------------------------------------------------------- merge verifies
def _merge_cli(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvl_ros.offline.cli", "merge", str(shards), "--out", str(out),
                           *extra], capture_output=True, text=True)


def test_a_swapped_shard_bag_is_refused_before_anything_is_written(case):
    shards = case["shards"]
    os.rename(shards / "shard-00001", case["tmp"] / "one")
    os.rename(shards / "shard-00002", shards / "shard-00001")
    os.rename(case["tmp"] / "one", shards / "shard-00002")
    run = _merge_cli(shards, case["tmp"] / "out", "--export", str(case["tmp"] / "out-export"))
    assert run.returncode == 2, run.stderr
    assert "shard-00001 is not the shard its marker vouches for (its bag holds" in run.stderr
    assert not (case["tmp"] / "out").exists() and not (case["tmp"] / "out-export").exists()


def test_a_shard_directory_that_is_a_link_is_refused_naming_it(case):
    shards = case["shards"]
    shutil.rmtree(shards / "shard-00002")
    (shards / "shard-00002").symlink_to(case["outside"] / "copy-of-shard-00002")
    run = _merge_cli(shards, case["tmp"] / "out", "--export", str(case["tmp"] / "out-export"))
    assert run.returncode == 2, run.stderr
    assert f"{shards / 'shard-00002'} is a symbolic link" in run.stderr
    assert not (case["tmp"] / "out").exists()


def _flip_message_bytes(bag: Path) -> None:
    """Change one byte inside the first stored message's data, in place (same size)."""
    mcap = next(bag.glob("*.mcap"))
    data = bytearray(mcap.read_bytes())
    _, _, raw = _messages(bag)[0]
    at = data.find(raw[200:264])  # a run of feature bytes, unique in the file
    assert at > 0 and data.find(raw[200:264], at + 1) < 0
    data[at + 7] ^= 0x40
    mcap.write_bytes(bytes(data))


def test_a_shard_changed_in_place_stops_the_merge_and_leaves_it_marked_incomplete(case):
    """Same counts and stamps, one byte different: the merge stops with exit 1 when it reads that
    shard (by its fingerprint, or by the bag's own check), and the output keeps its marker."""
    _flip_message_bytes(case["shards"] / "shard-00001")
    out = case["tmp"] / "out"
    run = _merge_cli(case["shards"], out, "--export", str(case["tmp"] / "out-export"))
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert (out / INCOMPLETE_MARKER).is_file()
    assert (case["tmp"] / "out-export" / INCOMPLETE_MARKER).is_file()


def _damage_last_chunk(bag: Path) -> None:
    """Garble the length of the first record inside the bag file's last mcap chunk: rosbags then
    yields none of that chunk's messages, and raises nothing."""
    mcap = next(bag.glob("*.mcap"))
    data = bytearray(mcap.read_bytes())
    pos, chunks = 8, []  # after the magic: records of opcode (1 byte), length (8 bytes), content
    while pos < len(data) and data[pos] != 0x0F:  # up to the footer
        if data[pos] == 0x06:
            chunks.append(pos)
        pos += 9 + struct.unpack_from("<Q", data, pos + 1)[0]
    at = chunks[-1] + 9 + 28  # after the chunk's times, uncompressed size and crc
    at += 4 + struct.unpack_from("<I", data, at)[0] + 8  # its compression name and records length
    data[at + 4] ^= 0x55  # inside the first record's length
    mcap.write_bytes(bytes(data))


def test_a_damaged_shard_bag_stops_the_merge_and_leaves_it_marked_incomplete(case):
    """A chunk rosbags cannot read: it silently yields fewer messages (before: merged with exit 0
    and the output looked finished); now the merge sees the messages differ from the marker."""
    _damage_last_chunk(case["shards"] / "shard-00002")
    out = case["tmp"] / "out"
    run = _merge_cli(case["shards"], out, "--export", str(case["tmp"] / "out-export"))
    assert run.returncode == 1, run.stderr
    assert "shard-00002: the messages read differ from what its marker recorded" in run.stderr
    assert "is left marked incomplete" in run.stderr and (out / INCOMPLETE_MARKER).is_file()
    assert len(_messages(out)) < len(_messages(case["tmp"] / "merged"))  # what was written, readable


def test_a_truncated_shard_bag_is_refused_before_anything_is_written(case):
    mcap = next((case["shards"] / "shard-00002").glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    run = _merge_cli(case["shards"], case["tmp"] / "out", "--export", str(case["tmp"] / "out-export"))
    assert run.returncode == 2, run.stderr
    assert "shard-00002 is not the shard its marker vouches for (its bag cannot be read" in run.stderr
    assert not (case["tmp"] / "out").exists()


def test_a_changed_export_file_stops_the_merge(case):
    export = case["shards"] / "shard-00001.export"
    shard_file = next(export.glob("*.safetensors"))
    data = bytearray(shard_file.read_bytes())
    data[-5] ^= 0x01
    shard_file.write_bytes(bytes(data))
    out = case["tmp"] / "out"
    run = _merge_cli(case["shards"], out, "--export", str(case["tmp"] / "out-export"))
    assert run.returncode == 1, run.stderr
    assert f"{shard_file} differs from what the marker records" in run.stderr
    assert (out / INCOMPLETE_MARKER).is_file()


@pytest.mark.parametrize("kind", ["list", "directory", "no fingerprint"])
def test_a_marker_that_is_no_marker_is_named_without_a_traceback(case, kind):
    marker = case["shards"] / "shard-00001.json"
    if kind == "list":
        marker.write_text("[1, 2, 3]")
    elif kind == "directory":
        marker.unlink()
        marker.mkdir()
    else:
        data = json.loads(marker.read_text())
        del data["bag"]
        marker.write_text(json.dumps(data))
    run = _merge_cli(case["shards"], case["tmp"] / "out")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert str(marker) in run.stderr
    assert not (case["tmp"] / "out").exists()


def test_counts_are_those_written_and_the_merge_is_the_same_as_before(case, base):
    counts = merge(case["shards"], case["tmp"] / "out", case["tmp"] / "out-export")
    got = _messages(case["tmp"] / "out")
    assert got == base["messages"]
    assert counts["messages"] == len(got)
    assert counts["sets"] == len([m for m in got if m[0] == "/qvl/features"]) == 25
    assert not (case["tmp"] / "out" / INCOMPLETE_MARKER).exists()
    assert not (case["tmp"] / "out-export" / INCOMPLETE_MARKER).exists()


def test_a_lying_marker_count_is_refused(case):
    marker = case["shards"] / "shard-00001.json"
    data = json.loads(marker.read_text())
    data["sets"] += 5
    data["bag"]["sets"] += 5
    marker.write_text(json.dumps(data))
    with pytest.raises(ex.ExtractError, match=r"shard-00001 is not the shard its marker vouches for .*sets; the "
                                              r"marker records \d+ messages, 15 sets"):
        merge(case["shards"], case["tmp"] / "out", case["tmp"] / "out-export")


# ------------------------------------------------------------------- nothing outside is touched
def _link_partial(c):
    shutil.rmtree(c["shards"] / ".partial", ignore_errors=True)
    (c["shards"] / ".partial").symlink_to(c["outside"])
    return c["shards"] / ".partial"


def _link_partial_shard(c):
    (c["shards"] / ".partial").mkdir(exist_ok=True)
    (c["shards"] / ".partial" / "shard-00001").symlink_to(c["outside"] / "shard-00001")
    return c["shards"] / ".partial" / "shard-00001"


def _link_shard(c):
    shutil.rmtree(c["shards"] / "shard-00002")
    (c["shards"] / "shard-00002").symlink_to(c["outside"] / "copy-of-shard-00002")
    return c["shards"] / "shard-00002"


def _link_shard_export(c):
    shutil.rmtree(c["shards"] / "shard-00002.export")
    (c["shards"] / "shard-00002.export").symlink_to(c["outside"] / "shard-00001.export")
    return c["shards"] / "shard-00002.export"


def _link_marker(c):
    marker = c["shards"] / "shard-00002.json"
    shutil.copy(marker, c["outside"] / "marker.json")
    marker.unlink()
    marker.symlink_to(c["outside"] / "marker.json")
    return marker


def _link_marker_tmp(c):
    tmp = c["shards"] / ".shard-00001.json.tmp"
    tmp.symlink_to(c["outside"] / "victim.txt")
    return tmp


def _link_plan_tmp(c):
    tmp = c["shards"] / ".plan.json.tmp"
    tmp.symlink_to(c["outside"] / "victim.txt")
    return tmp


def _link_lock(c):
    lock = c["shards"] / ".lock"
    lock.symlink_to(c["outside"] / "made-by-the-lock")
    return lock


def _link_plan(c):
    plan = c["shards"] / "plan.json"
    shutil.copy(plan, c["outside"] / "plan.json")
    plan.unlink()
    plan.symlink_to(c["outside"] / "plan.json")
    return plan


def _link_bag_file(c):
    mcap = next((c["shards"] / "shard-00002").glob("*.mcap"))
    shutil.copy(mcap, c["outside"] / "bag.mcap")
    mcap.unlink()
    mcap.symlink_to(c["outside"] / "bag.mcap")
    return mcap


def _link_shards_dir(c):
    os.rename(c["shards"], c["outside"] / "real-shards")
    c["shards"].symlink_to(c["outside"] / "real-shards")
    return c["shards"]


LINKS = {".partial": _link_partial, ".partial/shard": _link_partial_shard, "shard": _link_shard,
         "shard.export": _link_shard_export, "marker": _link_marker, "marker tmp": _link_marker_tmp,
         "plan tmp": _link_plan_tmp, "lock": _link_lock, "plan": _link_plan, "bag file": _link_bag_file,
         "shards dir": _link_shards_dir}


def _operate(c, op: str):
    """Run ``op`` on the case's shards directory: 'resume', '--force' or 'merge --force'."""
    shards = c["shards"]
    if op == "resume":
        return fleet.run_sharded(_config(c["rec"], shards, c["tmp"] / "export"), OPTS, stream=io.StringIO(),
                                 progress="none")
    if op == "--force":
        return fleet.run_sharded(_config(c["rec"], shards, c["tmp"] / "export", force=True), OPTS,
                                 stream=io.StringIO(), progress="none")
    return merge(shards, c["tmp"] / "merged", force=True)


@pytest.mark.parametrize("op", ["resume", "--force", "merge --force"])
@pytest.mark.parametrize("link", sorted(LINKS))
def test_no_file_outside_the_shards_directory_changes_whatever_links_it_holds(case, link, op):
    """Every link a shards directory could hold, on resume, --force and merge --force: the run is
    refused naming the link, and every file around the shards directory is unchanged (hashed).
    Before, resume deleted through a linked .partial, wrote through a linked temporary marker and
    made the lock file where a link pointed."""
    named = LINKS[link](case)
    if op == "resume":
        (case["shards"] / "shard-00001.json").unlink(missing_ok=True)  # shard 1 is to be redone
    before = _snapshot(case["tmp"], case["shards"])
    with pytest.raises(ex.ExtractError) as refused:
        _operate(case, op)
    assert _snapshot(case["tmp"], case["shards"]) == before
    assert str(named) in str(refused.value)
    assert "symbolic link" in str(refused.value)


def test_merge_force_deletes_no_export_directory_that_is_not_one_of_this_tool(case):
    """plan.json names an outside directory holding an index.json and a labels.json: `merge --force`
    refuses it (before, it was deleted: any *.json passed as an export)."""
    labels = case["outside"] / "labels"
    plan = json.loads((case["shards"] / "plan.json").read_text())
    plan["export_dir"] = str(labels)
    (case["shards"] / "plan.json").write_text(json.dumps(plan))
    before = _snapshot(case["tmp"], case["shards"])
    with pytest.raises(ex.ExtractError, match=f"export directory {labels} exists and does not look like an "
                                              f"earlier output"):
        merge(case["shards"], case["tmp"] / "merged", force=True)
    assert _snapshot(case["tmp"], case["shards"]) == before


def test_merge_force_refuses_an_export_named_in_the_plan_behind_a_link(case):
    (case["tmp"] / "via").symlink_to(case["tmp"])
    plan = json.loads((case["shards"] / "plan.json").read_text())
    plan["export_dir"] = str(case["tmp"] / "via" / "export")
    (case["shards"] / "plan.json").write_text(json.dumps(plan))
    before = _snapshot(case["tmp"], case["shards"])
    with pytest.raises(ex.ExtractError, match=f"names the export directory {case['tmp'] / 'via' / 'export'}, "
                                              f"which resolves to {case['tmp'] / 'export'}"):
        merge(case["shards"], case["tmp"] / "merged", force=True)
    assert _snapshot(case["tmp"], case["shards"]) == before


def test_merge_force_refuses_an_output_that_is_a_link_or_holds_one(case):
    merged = case["tmp"] / "merged"
    mcap = next(merged.glob("*.mcap"))
    shutil.copy(mcap, case["outside"] / "merged.mcap")
    mcap.unlink()
    mcap.symlink_to(case["outside"] / "merged.mcap")
    before = _snapshot(case["tmp"], case["shards"])
    with pytest.raises(ex.ExtractError, match=f"output {merged} exists and does not look like an earlier output"):
        merge(case["shards"], merged, force=True)
    assert _snapshot(case["tmp"], case["shards"]) == before


def test_a_clean_resume_and_force_still_work(case, base):
    """The checks refuse links only: a shard to redo is redone, --force starts over, merge --force
    replaces the earlier merge, with the same messages each time."""
    (case["shards"] / "shard-00001.json").unlink()
    assert _operate(case, "resume") == 0
    assert _operate(case, "--force") == 0
    counts = _operate(case, "merge --force")
    assert _messages(case["tmp"] / "merged") == base["messages"] and counts["sets"] == 25
