"""Feature arrays on disk for ML use: safetensors shards plus a JSON index, loadable in one line.

    from qvl_ros.offline.export import load_features
    feats = load_features("features_dir")
    feats["vision/front"]      # torch tensor (S, tokens, D), one row per synchronized set
    feats["hidden"]            # (S, L, D) decoder states of the real tokens (right padded)
    feats["stamp_ns"]          # int64 (S,) stamp of each set (newest camera stamp)
    feats["camera_stamps_ns"]  # int64 (S, N) each camera's own stamp
    feats["camera_names"]      # list of N names;  feats["captions"]: list of S strings or None

Layout of a directory::

    index.json                   format, model, prompt, camera_names, topics, features, dtype,
                                 number of sets, and the shards with the set range each holds
    features-00000.safetensors   stamp_ns (n,), camera_stamps_ns (n, N), vision/<camera>
    features-00001.safetensors   (n, T, D), hidden (n, L, D); captions in the file's metadata

Every shard is a plain safetensors file (``safetensors.torch.load_file`` reads one). Tensors
keep the model's dtype (bfloat16 included). When a tensor's first dimension differs between
sets (a camera changed resolution, prompts of different length), rows are right padded with
zeros to the longest and ``<name>:length`` (int64, (n,)) gives each row's real length;
:func:`load_features` applies the same rule across shards.

Shards are written whole (temporary file, then rename) and the index is rewritten after each
one, so an interrupted export is still a consistent, loadable directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["FeatureExporter", "load_features", "INDEX_NAME", "FORMAT"]

INDEX_NAME = "index.json"
FORMAT = "qvl_ros.features/1"
_SHARD = "features-{:05d}.safetensors"


def _pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack (T_i, ...) tensors into (n, max T, ...); lengths when the T_i differ, else None."""
    lengths = [int(r.shape[0]) if r.dim() else 1 for r in rows]
    if len(set(lengths)) <= 1 and len({tuple(r.shape) for r in rows}) <= 1:
        return torch.stack(list(rows)), None
    tail = {tuple(r.shape[1:]) for r in rows}
    if len(tail) != 1:
        raise ValueError(f"cannot stack tensors of shapes {sorted({tuple(r.shape) for r in rows})}")
    out = rows[0].new_zeros((len(rows), max(lengths), *tail.pop()))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, torch.tensor(lengths, dtype=torch.int64)


class FeatureExporter:
    """Collects per-set tensors and writes them as shards of about ``shard_bytes`` each."""

    def __init__(self, directory: str | os.PathLike, camera_names: Sequence[str], topics: Sequence[str],
                 model: str, prompt: str, features: Sequence[str], captions: bool,
                 shard_bytes: int = 512 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.meta = {
            "format": FORMAT, "model": model, "prompt": prompt, "camera_names": list(camera_names),
            "topics": list(topics), "features": list(features), "captions": bool(captions),
            "dtype": None, "sets": 0, "shards": [],
        }
        self.shard_bytes = int(shard_bytes)
        self._rows: list[dict[str, torch.Tensor]] = []
        self._stamps: list[Sequence[int]] = []
        self._texts: list[str] = []
        self._pending_bytes = 0
        self._write_index()

    def add(self, camera_stamps_ns: Sequence[int], tensors: Sequence[tuple[str, torch.Tensor]],
            caption: str | None = None) -> None:
        """One synchronized set: its camera stamps and its named host tensors."""
        row = {name: t for name, t in tensors}
        self._rows.append(row)
        self._stamps.append(tuple(int(s) for s in camera_stamps_ns))
        if caption is not None:
            self._texts.append(caption)
        if self.meta["dtype"] is None and row:
            self.meta["dtype"] = str(next(iter(row.values())).dtype).removeprefix("torch.")
        self._pending_bytes += sum(t.numel() * t.element_size() for t in row.values())
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the collected sets as one shard (nothing if none) and update the index."""
        if not self._rows:
            return
        from safetensors.torch import save_file

        n = len(self._rows)
        stamps = torch.tensor(self._stamps, dtype=torch.int64)
        arrays: dict[str, torch.Tensor] = {
            "stamp_ns": stamps.max(dim=1).values.contiguous(),
            "camera_stamps_ns": stamps,
        }
        for name in self._rows[0]:
            stacked, lengths = _pad_rows([row[name] for row in self._rows])
            arrays[name] = stacked.contiguous()
            if lengths is not None:
                arrays[f"{name}:length"] = lengths
        metadata = {"format": FORMAT}
        if self.meta["captions"]:
            metadata["captions"] = json.dumps(self._texts)
        index = len(self.meta["shards"])
        name = _SHARD.format(index)
        tmp = self.dir / f".{name}.tmp"
        save_file(arrays, str(tmp), metadata=metadata)
        os.replace(tmp, self.dir / name)
        self.meta["shards"].append({"file": name, "first_set": self.meta["sets"], "sets": n})
        self.meta["sets"] += n
        self._rows, self._stamps, self._texts, self._pending_bytes = [], [], [], 0
        self._write_index()

    def close(self) -> None:
        self.flush()

    def _write_index(self) -> None:
        tmp = self.dir / f".{INDEX_NAME}.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
        os.replace(tmp, self.dir / INDEX_NAME)


def load_features(directory: str | os.PathLike) -> dict[str, Any]:
    """All shards of an export directory as one dict (see the module doc for the keys)."""
    from safetensors import safe_open

    root = Path(directory)
    meta = json.loads((root / INDEX_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root}: not a qvl_ros feature export (format {meta.get('format')!r})")
    parts: dict[str, list[torch.Tensor]] = {}
    lengths: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    for shard in meta["shards"]:
        with safe_open(str(root / shard["file"]), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                if key.endswith(":length"):
                    continue
                t = f.get_tensor(key)
                parts.setdefault(key, []).append(t)
                if key not in ("stamp_ns", "camera_stamps_ns"):
                    if f"{key}:length" in keys:
                        lengths.setdefault(key, []).append(f.get_tensor(f"{key}:length"))
                    else:
                        lengths.setdefault(key, []).append(
                            torch.full((t.shape[0],), t.shape[1] if t.dim() > 1 else 1, dtype=torch.int64))
            if meta.get("captions"):
                captions.extend(json.loads((f.metadata() or {}).get("captions", "[]")))
    out: dict[str, Any] = {}
    for key, chunks in parts.items():
        if key in lengths and len({c.shape[1:] for c in chunks}) > 1:
            longest = max(c.shape[1] for c in chunks)
            chunks = [torch.nn.functional.pad(c, (0, 0) * (c.dim() - 2) + (0, longest - c.shape[1]))
                      for c in chunks]
        out[key] = torch.cat(chunks) if chunks else torch.empty(0)
        if key in lengths:
            lens = torch.cat(lengths[key])
            if bool((lens != out[key].shape[1]).any()):
                out[f"{key}:length"] = lens
    if not meta["shards"]:
        out["stamp_ns"] = torch.empty(0, dtype=torch.int64)
        out["camera_stamps_ns"] = torch.empty((0, len(meta["camera_names"])), dtype=torch.int64)
    out["camera_names"] = list(meta["camera_names"])
    out["topics"] = list(meta["topics"])
    out["model"] = meta["model"]
    out["prompt"] = meta["prompt"]
    out["captions"] = captions if meta.get("captions") else None
    return out
