"""Checkpoint loading: read Hugging Face Qwen-VL directories and find where a model lives.

Reading accepts both weight layouts: the released one (`visual.*`, `model.layers.*`, `lm_head.*`)
and the one transformers 5.x saves (`model.visual.*`, `model.language_model.*`), sharded or not,
safetensors only (names: :mod:`.weights`). The tiny test checkpoints are written by :mod:`.tiny`;
their names stay importable from here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import QwenVLConfig
from .tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, default_tiny_checkpoint, save_tiny_checkpoint  # noqa: F401
from .weights import canonical_name, expected_weights  # noqa: F401
from .weights_check import WeightsError

__all__ = ["read_tensors", "check_weights", "read_weights", "resolve_checkpoint", "expected_weights",
           "canonical_name", "save_tiny_checkpoint", "default_tiny_checkpoint", "SPECIAL_TOKENS", "CHAT_TEMPLATE"]


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (sharded or not, safetensors only), by released-layout name."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        bins = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {bins}; only safetensors are loaded)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as st:
                for k in st.keys():
                    tensors[canonical_name(k)] = st.get_tensor(k)
        except (OSError, SafetensorError) as exc:  # a truncated, empty or garbled file
            raise WeightsError(f"{path / f}: not a readable safetensors file ({exc})") from None
    return tensors


def _file_holding(path, name: str) -> str:
    """The weight file of ``path`` that holds the released-layout weight ``name`` (for an error)."""
    from safetensors import safe_open

    path = Path(path)
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if any(canonical_name(k) == name for k in st.keys()):
                return str(f)
    return str(path)


def check_weights(tensors: dict[str, torch.Tensor], cfg: QwenVLConfig, path, absent=()) -> dict[str, torch.Tensor]:
    """`tensors` after checking names and shapes against the config; names in `absent` (weights held
    elsewhere, e.g. 4-bit linears) are not expected."""
    want = expected_weights(cfg)
    for k in absent:
        want.pop(k, None)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights: {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected weights: {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        raise ValueError(f"checkpoint {path} does not match its config: " + "; ".join(parts))
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(f"{_file_holding(path, k)}: weight {k} has shape {tuple(tensors[k].shape)}, "
                             f"config.json expects {shape}")
    return tensors


def read_weights(path: str | os.PathLike, cfg: QwenVLConfig) -> dict[str, torch.Tensor]:
    """All weights of a float checkpoint directory, by released-layout name; checks names and shapes."""
    return check_weights(read_tensors(path), cfg, path)


def resolve_checkpoint(spec: str | os.PathLike | None) -> Path:
    """Where a model lives: ``""``/``"tiny"`` -> the bundled tiny Qwen2.5-VL; ``"tiny-qwen2-vl"`` ->
    tiny Qwen2-VL; a directory -> itself; ``org/name`` -> that model's snapshot in the local Hugging
    Face cache (never downloads). Raises FileNotFoundError otherwise."""
    p = str(spec or "").strip()
    if p in ("", "tiny", "tiny-qwen2.5-vl", "tiny-qwen2_5_vl"):
        return default_tiny_checkpoint("qwen2_5_vl")
    if p in ("tiny-qwen2-vl", "tiny-qwen2_vl"):
        return default_tiny_checkpoint("qwen2_vl")
    local = Path(p).expanduser()
    if local.is_dir():
        return local
    if p.count("/") == 1 and not p.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(p, local_files_only=True))
        except Exception as exc:
            raise FileNotFoundError(f"model {p!r} is neither a directory nor in the local Hugging Face cache "
                                    f"(nothing is downloaded): {exc}") from None
    raise FileNotFoundError(f"model {p!r}: no such directory")
