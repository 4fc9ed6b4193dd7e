"""Checks of a checkpoint's files and weights that the loader runs before trusting them.

:func:`check_checkpoint_files`: the weight files (``*.safetensors``, or those an index names)
are regular files inside the directory, and a tokenizer is there; a problem is named instead of
surfacing later as an unrelated error ("No such device" from a directory named like a weight
file, a chat template that "did not render" for a missing tokenizer).

:func:`check_finite`: NaN or Inf in any floating-point weight (4-bit scales included), reported
at load with the tensors' names and counts, instead of non-finite features later. One sum per
tensor (no copy of the weights) decides; ``from_pretrained(check_finite=False)`` skips it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["WeightsError", "check_checkpoint_files", "check_finite", "nonfinite_counts"]

_CHUNK = 1 << 24  # elements per isfinite pass: a 16 M-element bool temporary at most
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class WeightsError(ValueError):
    """A checkpoint's weights or files that cannot be used (the text names the file or tensors)."""


def _weight_names(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index}: no weight_map of file names ({exc})") from None
        return names
    return sorted(p.name for p in path.glob("*.safetensors"))


def check_checkpoint_files(path) -> None:
    """WeightsError naming the file when a weight file is not a regular file in ``path`` (a
    link to one, as in the Hugging Face cache, is fine) or when no tokenizer is there."""
    path = Path(path)
    for name in _weight_names(path):
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise WeightsError(f"{path / 'model.safetensors.index.json'} names {name!r}: not a file name in {path}")
        if (path / name).exists() and not (path / name).is_file():
            raise WeightsError(f"{path / name} is not a regular file")
    if not any(all((path / f).is_file() for f in files) for files in _TOKENIZER_FILES):
        raise WeightsError(f"{path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")


def nonfinite_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: number of NaN or Inf elements} of the floating-point tensors that hold any. A sum
    is finite only when every element is (NaN and Inf propagate), so one sum per tensor settles
    the usual case; a tensor whose sum is not finite (or overflows, as a float16 sum can) is
    counted exactly, in chunks."""
    bad = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)  # (numel,) a view of a contiguous tensor
        if bool(torch.isfinite(flat.sum())):  # in the tensor's dtype: an overflow only sends it to the count
            continue
        count = sum(int(chunk.numel() - torch.isfinite(chunk).sum()) for chunk in flat.split(_CHUNK))
        if count:
            bad[name] = count
    return bad


def check_finite(tensors: dict[str, torch.Tensor], path) -> None:
    """WeightsError naming the tensors (up to 5, with counts) that hold NaN or Inf."""
    bad = nonfinite_counts(tensors)
    if bad:
        shown = ", ".join(f"{n} ({c})" for n, c in sorted(bad.items())[:5]) + (" ..." if len(bad) > 5 else "")
        raise WeightsError(f"checkpoint {path}: {len(bad)} weight tensors hold NaN or Inf values: {shown} (load "
                           f"with check_finite=False to skip this check)")
