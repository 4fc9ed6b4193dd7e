"""Keeps an extraction's output directory either valid or visibly incomplete.

An mcap bag is only readable once its summary and ``metadata.yaml`` are written at close. A
run that dies before that (SIGKILL, a crash of the process, a power cut) cannot write them, so
:class:`OutputGuard` puts a marker file, :data:`INCOMPLETE_MARKER`, into the directory right
after it is created and removes it only after every file was closed; a directory holding the
marker is an incomplete output, which ``--force`` may delete (:func:`looks_like_output`).

A full disk is handled before it corrupts anything: the guard keeps a reserve file of
``2 MiB + 2 x the largest message`` in the directory (preallocated, so it really occupies the
space). Before each batch is written, the reserve is grown to cover the largest message and
the free space is checked against the batch plus one pending mcap chunk; when either fails,
:class:`DiskFull` is raised while the bag is still consistent, the reserve is deleted, and its
space is what closing the bag (the last chunk, the summary, the metadata) needs. The sets
written up to then stay in a valid bag. (Another process filling the disk between the check
and the write can still make a write fail: then closing is tried all the same and, if it fails
too, the output keeps its marker and the run says so.)
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["INCOMPLETE_MARKER", "RESERVE_NAME", "DiskFull", "OutputGuard", "looks_like_output",
           "looks_like_export", "remove_earlier_output", "check_writable"]

INCOMPLETE_MARKER = "EXTRACTION_INCOMPLETE"
RESERVE_NAME = ".qvl_space_reserve"
_BAG_SUFFIXES = (".mcap", ".db3", ".zstd", ".yaml", ".db3-shm", ".db3-wal")
_BASE_RESERVE = 2 << 20
_CHUNK = 1 << 20  # rosbags' mcap writer buffers a chunk of about this size before writing it


class DiskFull(OSError):
    """The output's file system has no room for the next batch (the bag is still consistent)."""


def check_writable(path: Path) -> None:
    """Raise OSError (with the reason) unless ``path`` could be created: its nearest existing
    ancestor must be a directory in which a file can really be created (os.access is not
    enough: it says yes to root on a read-only file system)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(parent))
    fd, probe = tempfile.mkstemp(prefix=".qvl_probe_", dir=parent)
    os.close(fd)
    os.unlink(probe)


def _regular_files(path: Path) -> list[Path] | None:
    """The entries of a real directory (not a link) when all are regular files (no link either)."""
    if path.is_symlink() or not path.is_dir():
        return None
    entries = list(path.iterdir())
    return entries if all(e.is_file() and not e.is_symlink() for e in entries) else None


def looks_like_output(path: Path) -> bool:
    """Whether ``path`` is an output of this tool that ``--force`` may delete: a directory of
    bag files only, with metadata.yaml (finished), or with the incomplete marker (and maybe
    the reserve), or holding nothing but the bag file its run had just created. No entry may be
    a symbolic link, nor the directory itself."""
    entries = _regular_files(path)
    if entries is None:
        return False
    names = {e.name for e in entries}
    ours = {INCOMPLETE_MARKER, RESERVE_NAME}
    if not all(e.name in ours or e.name.endswith(_BAG_SUFFIXES) for e in entries):
        return False
    return ("metadata.yaml" in names or INCOMPLETE_MARKER in names
            or names == {f"{path.name}.mcap"})


_EXPORT_FILE = re.compile(r"features-\d{5}\.safetensors|\.features-\d{5}\.safetensors\.tmp|\.?index\.json(\.tmp)?")


def looks_like_export(path: Path) -> bool:
    """Whether ``path`` is a feature export of this tool that ``--force`` may delete: an
    ``index.json`` of the export format and nothing but the files an export writes (its
    safetensors shards, their temporary files, the incomplete marker), none a link."""
    from .export import FORMAT, INDEX_NAME

    entries = _regular_files(path)
    if entries is None or not all(_EXPORT_FILE.fullmatch(e.name) or e.name == INCOMPLETE_MARKER for e in entries):
        return False
    try:
        index = json.loads((path / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == FORMAT


def remove_earlier_output(path: Path, looks_ok, what: str) -> None:
    """Delete an earlier output that ``--force`` replaces, after checking again that it is one
    (``looks_ok``: :func:`looks_like_output` or :func:`looks_like_export`), so that nothing a
    link points to, and nothing that is not this tool's, is deleted. OSError names the path."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not looks_ok(path):
        raise OSError(errno.EPERM, f"{what} {path} does not look like an earlier output (or is a link); "
                                   f"refusing to delete it", str(path))
    shutil.rmtree(path)  # no link inside (checked); rmtree never follows one anyway


class OutputGuard:
    """Marker and space reserve of one output directory (see the module doc)."""

    def __init__(self, directory: Path, what: str = "qvl-ros extract") -> None:
        self.directory = Path(directory)
        self.marker = self.directory / INCOMPLETE_MARKER
        self.reserve = self.directory / RESERVE_NAME
        self.reserved = 0
        self.largest = 0
        self._what = what

    def marker_text(self) -> str:
        return (f"This directory is the output of a {self._what} run started at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}) that has not finished.\n"
                f"If no run is writing it, the run was killed or failed: the bag in it may not be readable\n"
                f"or may miss messages. Run it again with --force to replace it.\n")

    def start(self) -> None:
        """Mark the (just created) directory incomplete and take the base reserve."""
        self.marker.write_text(self.marker_text())
        self.ensure(0)

    def before_write(self, batch_bytes: int, largest_message: int) -> None:
        """Raise :class:`DiskFull` unless a batch of ``batch_bytes`` fits (with the bag's pending
        chunk of up to 1 MiB) and the reserve still covers closing afterwards."""
        self.ensure(largest_message)
        free = shutil.disk_usage(self.directory).free
        need = int(batch_bytes) + _CHUNK + (64 << 10)
        if free < need:
            raise DiskFull(errno.ENOSPC, f"{free >> 10} KiB left in {self.directory}, the next batch "
                                         f"needs up to {need >> 10} KiB")

    def ensure(self, next_bytes: int) -> None:
        """Grow the reserve so that closing still fits after writing messages of ``next_bytes``."""
        self.largest = max(self.largest, int(next_bytes))
        want = _BASE_RESERVE + 2 * self.largest
        if want <= self.reserved:
            return
        try:
            with open(self.reserve, "ab") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, want)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    f.seek(0, os.SEEK_END)
                    f.write(bytes(want - f.tell()))
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(exc.errno, f"no space left for the next batch in {self.directory}") from None
            raise
        self.reserved = want

    def release(self) -> None:
        """Delete the reserve (before closing the files, whose last writes it makes room for)."""
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            pass
        self.reserved = 0

    def finish(self) -> None:
        """Every file is closed: the output is complete."""
        self.release()
        self.marker.unlink(missing_ok=True)
