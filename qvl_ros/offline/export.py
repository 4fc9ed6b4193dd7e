"""Feature arrays on disk for ML use: safetensors shards plus a JSON index, loadable in one line.

    from qvl_ros.offline.export import load_features
    feats = load_features("features_dir")
    feats["vision/front"]      # torch tensor (S, tokens, D), one row per synchronized set
    feats["hidden"]            # (S, L, D) decoder states of the real tokens (right padded)
    feats["stamp_ns"]          # int64 (S,) stamp of each set (newest camera stamp)
    feats["camera_stamps_ns"]  # int64 (S, N) each camera's own stamp
    feats["camera_names"]      # list of N names;  feats["captions"]: list of S strings or None
    # with detections (qvl-ros extract --detect), per camera, K = its detections over all sets:
    feats["detections/front/boxes"]   # float32 (K, 4) x1, y1, x2, y2 in the camera's pixels
    feats["detections/front/scores"]  # float32 (K,);  ".../labels": list of K strings
    feats["detections/front/set"]     # int64 (K,) the set (row of stamp_ns) each belongs to

Layout of a directory::

    index.json                   format, model, prompt, camera_names, topics, features, dtype,
                                 number of sets, and the shards with the set range each holds
    features-00000.safetensors   stamp_ns (n,), camera_stamps_ns (n, N), vision/<camera>
    features-00001.safetensors   (n, T, D), hidden (n, L, D); captions in the file's metadata

Detections are stored per shard file as ``detections/<camera>/boxes``, ``.../scores`` and
``.../set`` (the set's index in the whole export, so the arrays of all files concatenate), their
labels as JSON in the file's metadata under ``detections/<camera>/labels``; a point (Qwen2.5-VL)
is a box of size 0, as in the bag's Detection2D. ``index.json`` names what was asked
(``detections``: cameras, classes or query, most per camera).

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

__all__ = ["FeatureExporter", "load_features", "detection_arrays", "INDEX_NAME", "FORMAT"]

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


def detection_arrays(cam) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(boxes float32 (K, 4), scores float32 (K,), labels) of one camera's CameraDetections; a point
    is a box of size 0, a detection with neither is left out (as in the bag)."""
    kept = [d for d in cam.detections if d.box is not None or d.point is not None]
    boxes = [tuple(d.box) if d.box is not None else (*d.point, *d.point) for d in kept]
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor([d.score for d in kept], dtype=torch.float32), [d.label for d in kept])


def _detection_key(camera: str, what: str) -> str:
    return f"detections/{camera}/{what}"


class FeatureExporter:
    """Collects per-set tensors and writes them as shards of about ``shard_bytes`` each."""

    def __init__(self, directory: str | os.PathLike, camera_names: Sequence[str], topics: Sequence[str],
                 model: str, prompt: str, features: Sequence[str], captions: bool,
                 shard_bytes: int = 512 << 20, detections: dict | None = None) -> None:
        """``detections``: what the run asked for ({"classes": [...] or "query": ..., "max": N}),
        None without detections."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.meta = {
            "format": FORMAT, "model": model, "prompt": prompt, "camera_names": list(camera_names),
            "topics": list(topics), "features": list(features), "captions": bool(captions),
            "dtype": None, "sets": 0, "shards": [],
        }
        if detections is not None:
            self.meta["detections"] = {"cameras": list(camera_names), **detections}
        self._dets: list = []  # per set: per camera (boxes, scores, labels)
        self.shard_bytes = int(shard_bytes)
        self._rows: list[dict[str, torch.Tensor]] = []
        self._stamps: list[Sequence[int]] = []
        self._texts: list[str] = []
        self._pending_bytes = 0
        self._write_index()

    def add(self, camera_stamps_ns: Sequence[int], tensors: Sequence[tuple[str, torch.Tensor]],
            caption: str | None = None, detections: Sequence | None = None) -> None:
        """One synchronized set: its camera stamps, its named host tensors and, with detections, per
        camera (boxes (K, 4), scores (K,), labels) (:func:`detection_arrays`)."""
        if ("detections" in self.meta) != (detections is not None):
            raise ValueError("detections are given for every set of an export with detections, and only then")
        if detections is not None:
            if len(detections) != len(self.meta["camera_names"]):
                raise ValueError(f"detections for {len(detections)} cameras, the export has "
                                 f"{len(self.meta['camera_names'])}")
            self._dets.append(list(detections))
            self._pending_bytes += sum(b.numel() * 4 + s.numel() * 4 for b, s, _ in detections)
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
        if "detections" in self.meta:
            self._detection_arrays(arrays, metadata)
        index = len(self.meta["shards"])
        name = _SHARD.format(index)
        tmp = self.dir / f".{name}.tmp"
        save_file(arrays, str(tmp), metadata=metadata)
        os.replace(tmp, self.dir / name)
        self.meta["shards"].append({"file": name, "first_set": self.meta["sets"], "sets": n})
        self.meta["sets"] += n
        self._rows, self._stamps, self._texts, self._dets, self._pending_bytes = [], [], [], [], 0
        self._write_index()

    def _detection_arrays(self, arrays: dict, metadata: dict) -> None:
        """The collected sets' detections, per camera, into a shard's arrays and metadata."""
        first = self.meta["sets"]
        for k, camera in enumerate(self.meta["camera_names"]):
            per_set = [row[k] for row in self._dets]
            arrays[_detection_key(camera, "boxes")] = torch.cat([b for b, _, _ in per_set]).reshape(-1, 4).contiguous()
            arrays[_detection_key(camera, "scores")] = torch.cat([s for _, s, _ in per_set]).contiguous()
            arrays[_detection_key(camera, "set")] = torch.tensor(
                [first + i for i, (b, _, _) in enumerate(per_set) for _ in range(b.shape[0])], dtype=torch.int64)
            metadata[_detection_key(camera, "labels")] = json.dumps([x for _, _, labels in per_set for x in labels])

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
    labels: dict[str, list[str]] = {}
    for shard in meta["shards"]:
        with safe_open(str(root / shard["file"]), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                if key.endswith(":length"):
                    continue
                if key.startswith("detections/"):
                    parts.setdefault(key, []).append(f.get_tensor(key))
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
            for camera in (meta.get("detections") or {}).get("cameras", ()):
                key = _detection_key(camera, "labels")
                labels.setdefault(key, []).extend(json.loads((f.metadata() or {}).get(key, "[]")))
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
    for camera in (meta.get("detections") or {}).get("cameras", ()):
        for what, empty in (("boxes", (0, 4)), ("scores", (0,)), ("set", (0,))):
            key = _detection_key(camera, what)
            if key not in out:
                out[key] = torch.empty(empty, dtype=torch.int64 if what == "set" else torch.float32)
        out[_detection_key(camera, "labels")] = labels.get(_detection_key(camera, "labels"), [])
    out["camera_names"] = list(meta["camera_names"])
    out["topics"] = list(meta["topics"])
    out["model"] = meta["model"]
    out["prompt"] = meta["prompt"]
    out["captions"] = captions if meta.get("captions") else None
    return out
