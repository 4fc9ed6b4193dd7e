"""What a shards directory must be before anything in it is read, trusted or changed.

A shards directory (:mod:`qvl_ros.offline.shards`) is written by this tool only, so its layout
is known exactly: ``plan.json``, ``.lock``, ``.partial/``, ``shard-NNNNN/`` (a bag),
``shard-NNNNN.export/``, ``shard-NNNNN.json`` (a marker) and ``.<name>.tmp`` files of an
interrupted write. :func:`tree_problem` refuses anything else that could make a read or a
delete reach outside the directory: a symbolic link anywhere in those places, a marker that is
not a regular file, a shard that is not a directory.

A marker vouches for its shard with what was written at the shard's close (:func:`bag_summary`,
:func:`export_summary`): the bag's message and set counts, the range of its set stamps, and a
sha256 over every message (topic, recording time, serialized bytes, in stored order); the
export's files by name and sha256. `qvl-ros merge` checks the counts and the stamp range before
it writes anything and the fingerprint of every message it copies (:class:`BagDigest`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

__all__ = ["BagDigest", "MarkerError", "bag_summary", "export_summary", "tree_problem", "load_marker",
           "check_marker", "SHARD_NAME", "sync_tree", "write_new"]

SHARD_NAME = re.compile(r"shard-\d{5}(\.export|\.json)?")
PARTIAL_NAME = re.compile(r"shard-\d{5}(\.export|\.overlap)?")
_TOP_FILES = ("plan.json", ".lock")
_HASH_BLOCK = 1 << 20


class MarkerError(Exception):
    """A marker that cannot vouch for its shard (the text says which file and why)."""


class BagDigest:
    """Counts, stamp range and sha256 of a feature bag's messages, fed in stored order."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.messages = 0
        self.sets = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def add(self, topic: str, time_ns: int, raw: bytes) -> None:
        from .bag_io import FEATURES_TOPIC

        self._sha.update(f"{topic}\0{int(time_ns)}\0{len(raw)}\0".encode())
        self._sha.update(raw)
        self.messages += 1
        if topic == FEATURES_TOPIC:
            self.sets += 1
            self.first_ns = time_ns if self.first_ns is None else min(self.first_ns, time_ns)
            self.last_ns = time_ns if self.last_ns is None else max(self.last_ns, time_ns)

    def summary(self) -> dict:
        return {"messages": self.messages, "sets": self.sets, "first_ns": self.first_ns,
                "last_ns": self.last_ns, "sha256": self._sha.hexdigest()}


def bag_summary(path: Path) -> dict:
    """:class:`BagDigest` of a closed bag, read back as `qvl-ros merge` reads it."""
    from rosbags.rosbag2 import Reader

    digest = BagDigest()
    with Reader(path) as reader:
        for conn, t, raw in reader.messages():
            digest.add(conn.topic, t, bytes(raw))
    return digest.summary()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def export_summary(path: Path) -> dict:
    """{file name: sha256} of a closed export directory."""
    return {p.name: file_sha256(p) for p in sorted(Path(path).iterdir())}


# ------------------------------------------------------------------------------------- files
def sync_tree(path: Path, files: bool = True) -> None:
    """fsync a directory's files (``files``) and the directory itself."""
    if files:
        for p in Path(path).rglob("*"):
            if p.is_file() and not p.is_symlink():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, text: str) -> None:
    """``text`` into a file made anew at ``path``: an earlier file or link there is unlinked, never
    written through (a link would carry the write outside the directory)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ layout
def _kind(path: Path) -> str:
    """'link', 'dir', 'file', 'other' or 'missing', without following a link."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _entry_problem(entry: Path, want: str) -> str | None:
    kind = _kind(entry)
    if kind == "link":
        return f"{entry} is a symbolic link (to {entry.readlink()})"
    if kind != want:
        return f"{entry} is not a {'directory' if want == 'dir' else 'regular file'}"
    return None


def _inner_problem(directory: Path) -> str | None:
    """A shard's bag or export holds regular files only."""
    for entry in sorted(directory.iterdir()):
        problem = _entry_problem(entry, "file")
        if problem:
            return problem
    return None


def tree_problem(root: Path) -> str | None:
    """Why ``root`` is not a shards directory this tool may read, resume or delete (None: it is)."""
    root = Path(root)
    problem = _entry_problem(root, "dir")
    if problem:
        return problem
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name in _TOP_FILES or (name.startswith(".") and name.endswith(".tmp")):
            problem = _entry_problem(entry, "file")
        elif name == ".partial":
            problem = _entry_problem(entry, "dir") or _partial_problem(entry)
        elif SHARD_NAME.fullmatch(name) and name.endswith(".json"):
            problem = _entry_problem(entry, "file")
        elif SHARD_NAME.fullmatch(name):
            problem = _entry_problem(entry, "dir") or _inner_problem(entry)
        else:
            problem = f"{entry} is not a file of a sharded run"
        if problem:
            return problem
    return None


def _partial_problem(partial: Path) -> str | None:
    """Shards in progress: their bags and exports (regular files in directories), overlap files."""
    for entry in sorted(partial.iterdir()):
        if not PARTIAL_NAME.fullmatch(entry.name):
            return f"{entry} is not a file of a sharded run"
        if entry.name.endswith(".overlap"):
            problem = _entry_problem(entry, "file")
        else:
            problem = _entry_problem(entry, "dir") or _inner_problem(entry)
        if problem:
            return problem
    return None


# ----------------------------------------------------------------------------------- markers
_INT = (int,)
_MARKER_FIELDS = {"index": _INT, "start_ns": _INT, "read_start_ns": _INT, "overlap_ns": _INT, "sets": _INT,
                  "model": (str,), "device": (str,), "warmup_sets": (list,), "tail_sets": (list,),
                  "bag": (dict,)}
_BAG_FIELDS = {"messages": _INT, "sets": _INT, "sha256": (str,)}


def check_marker(marker, path: Path, index: int, export: bool) -> dict:
    """``marker`` (parsed JSON) when it is a marker of shard ``index``; MarkerError otherwise."""
    if not isinstance(marker, dict):
        raise MarkerError(f"{path} holds a JSON {type(marker).__name__}, not a shard marker")
    for fields, where, what in ((_MARKER_FIELDS, marker, ""), (_BAG_FIELDS, marker.get("bag"), "bag.")):
        for name, types in fields.items():
            value = where.get(name) if isinstance(where, dict) else None
            if not isinstance(value, types) or isinstance(value, bool):
                raise MarkerError(f"{path}: field {what}{name} is missing or not a {types[0].__name__} (a marker "
                                  f"of an older version or not one of this tool)")
    if marker["index"] != index:
        raise MarkerError(f"{path}: field index is {marker['index']}, the file is shard {index}'s")
    if marker["sets"] != marker["bag"]["sets"]:
        raise MarkerError(f"{path}: {marker['sets']} sets, but its bag summary counts {marker['bag']['sets']}")
    if export and not (isinstance(marker.get("export"), dict)
                       and all(isinstance(v, str) for v in marker["export"].values())):
        raise MarkerError(f"{path}: field export (file fingerprints) is missing")
    return marker


def load_marker(path: Path, index: int, export: bool) -> dict:
    """The marker at ``path``, checked (:func:`check_marker`); MarkerError when it is absent or bad."""
    problem = _entry_problem(path, "file")
    if problem:
        raise MarkerError(problem if _kind(path) != "missing" else f"{path} does not exist")
    try:
        marker = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise MarkerError(f"{path} cannot be read: {exc}") from None
    return check_marker(marker, path, index, export)
