"""Tiny deterministic checkpoints for tests, the demo and benchmarks: a complete offline Hugging
Face directory in the released layout (config.json, model.safetensors, tokenizer files with Qwen's
special tokens and a chat template, flat preprocessor_config.json, generation_config.json),
optionally with the decoder in an int4 format (:func:`qvl_ros.model.quant.quantize_weights`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import PRESETS, QwenVLConfig
from .processor import CLIP_MEAN, CLIP_STD
from .quant import quantize_weights
from .weights import expected_weights

__all__ = ["save_tiny_checkpoint", "default_tiny_checkpoint", "SPECIAL_TOKENS", "CHAT_TEMPLATE"]

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The conversation format of the Qwen2-VL family: a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|>, turns closed by <|im_end|> and a newline.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set ns.images = ns.images + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' + ns.images|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set ns.videos = ns.videos + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' + ns.videos|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _random_weights(cfg: QwenVLConfig, seed: int, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Drawn on `device` (seconds on a GPU for billions of weights), returned on the CPU in `dtype`."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda shape, generator: torch.randn(shape, generator=generator, device=device)
    out = {}
    for name, shape in expected_weights(cfg).items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm" in name \
                or name.endswith("ln_q.weight") or name == "model.norm.weight":
            t = 1.0 + 0.1 * randn(shape, g)
        elif name.endswith(".bias"):
            t = 0.05 * randn(shape, g)
        elif name == "model.embed_tokens.weight":
            t = randn(shape, g)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = randn(shape, g) / fan_in ** 0.5
        out[name] = t.to(dtype).cpu().contiguous()
    return out


def _hf_config_dict(cfg: QwenVLConfig) -> dict:
    ids = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    text = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": cfg.layers,
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    if cfg.is_v25:
        vision = {"depth": cfg.vision_depth, "hidden_size": cfg.vision_hidden, "hidden_act": cfg.vision_act,
                  "intermediate_size": cfg.vision_intermediate, "num_heads": cfg.vision_heads,
                  "in_chans": cfg.in_channels, "out_hidden_size": cfg.vision_out,
                  "patch_size": cfg.patch_size, "spatial_merge_size": cfg.merge_size,
                  "spatial_patch_size": cfg.patch_size, "temporal_patch_size": cfg.temporal_patch_size,
                  "window_size": cfg.window_size, "fullatt_block_indexes": list(cfg.fullatt_blocks),
                  "tokens_per_second": 2}
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        vision = {"depth": cfg.vision_depth, "embed_dim": cfg.vision_hidden, "hidden_size": cfg.vision_out,
                  "hidden_act": cfg.vision_act, "mlp_ratio": cfg.vision_intermediate // cfg.vision_hidden,
                  "num_heads": cfg.vision_heads, "in_chans": cfg.in_channels,
                  "patch_size": cfg.patch_size, "spatial_merge_size": cfg.merge_size,
                  "temporal_patch_size": cfg.temporal_patch_size}
        arch = "Qwen2VLForConditionalGeneration"
    return {"architectures": [arch], "model_type": cfg.family, **text,
            "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "float32",
            "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
            "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id, "vision_config": vision}


def _write_tokenizer(path: Path, model_max_length: int = 32768) -> None:
    """A byte-level BPE tokenizer (256 byte tokens, no merges) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # order the 256 byte symbols by the byte they stand for, as GPT-2 style vocabularies do
    table = {}
    n = 0
    for b in range(256):
        if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255):
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    assert set(table.values()) == set(byte_chars)
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    added = {str(256 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "model_max_length": model_max_length, "padding_side": "left", "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def save_tiny_checkpoint(path: str | os.PathLike, family: str = "qwen2_5_vl", seed: int = 0,
                         config: QwenVLConfig | None = None, quantize: str | None = None,
                         group_size: int | None = None, sym: bool = True, desc_act: bool = False,
                         twin: str | os.PathLike | None = None, device="cpu", dtype=torch.float32) -> Path:
    """Write a deterministic random checkpoint as a real Hugging Face directory.

    `family` is "qwen2_5_vl" or "qwen2_vl"; `config` overrides the preset (e.g. the "small"
    benchmark config). Same arguments give byte-identical weights. No network is used.
    `device` draws the weights there (a GPU draws billions in seconds; each device has its own
    random stream), `dtype` is the stored weight type.

    `quantize="awq"` or `"gptq"` stores the decoder linears in that 4-bit format (round to
    nearest, `group_size` input rows per group, by default the largest of 128, 64, 32 that the
    decoder's widths allow, refused here when loading would refuse it; GPTQ also `sym` and
    `desc_act`, act order) and
    writes at `twin` (default: "<path>-float") the float checkpoint holding exactly the
    dequantized weights, which any float implementation runs as the reference.
    """
    if config is None:
        if family not in ("qwen2_5_vl", "qwen2_vl"):
            raise ValueError(f"family must be 'qwen2_5_vl' or 'qwen2_vl', got {family!r}")
        config = PRESETS["tiny" if family == "qwen2_5_vl" else "tiny-qwen2-vl"]
    if quantize is not None and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise ValueError("quantized test checkpoints are drawn on the CPU in float32")
    weights, qconfig = _random_weights(config, seed, device, dtype), None
    if quantize is not None:
        weights, float_twin, qconfig = quantize_weights(weights, config, quantize, group_size, sym, desc_act, seed)
        _write_checkpoint(Path(twin) if twin is not None else Path(f"{path}-float"), config, float_twin)
    return _write_checkpoint(Path(path), config, weights, qconfig, dtype)


def _write_checkpoint(path: Path, cfg: QwenVLConfig, weights: dict, quantization_config: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = {**_hf_config_dict(cfg), "torch_dtype": str(dtype).removeprefix("torch.")}
    if quantization_config:
        hf["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    proc_class = "Qwen2_5_VLProcessor" if cfg.is_v25 else "Qwen2VLProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size, "merge_size": cfg.merge_size,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_rescale": True, "do_normalize": True,
        "rescale_factor": 1 / 255, "do_resize": True, "resample": 3, "do_convert_rgb": True,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": proc_class,
    }, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    eos = [256 + SPECIAL_TOKENS.index("<|im_end|>"), 256 + SPECIAL_TOKENS.index("<|endoftext|>")]
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eos[1], "eos_token_id": eos, "pad_token_id": eos[1], "do_sample": False,
    }, indent=2))
    _write_tokenizer(path)
    return path


def default_tiny_checkpoint(family: str = "qwen2_5_vl") -> Path:
    """The bundled tiny model: created on first use under the user cache, then reused."""
    root = Path(os.environ.get("QVL_ROS_CACHE", Path.home() / ".cache" / "qvl_ros"))
    path = root / f"tiny-{family}-seed0"
    if not (path / "tokenizer.json").exists():  # written last: its presence marks a complete directory
        import shutil

        tmp = root / f".tiny-{family}-{os.getpid()}"
        save_tiny_checkpoint(tmp, family=family, seed=0)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return path
