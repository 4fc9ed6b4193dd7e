"""One flat configuration for Qwen2.5-VL and Qwen2-VL, with named presets.

`QwenVLConfig.from_hf(hf_config)` reads a transformers config (old flat release layout or the
nested 5.x layout, both normalized by transformers' AutoConfig); presets cover the tiny test
model, the CPU benchmark model and the released sizes.

Checked before anything is allocated (:func:`load_checked_config`): config.json's sizes are
integers within :data:`LIMITS` (far above the released models, far below what would hang the
config parser or exhaust memory: 10^9 layers took transformers over 90 s to parse), its dtype a
torch dtype; then the parsed config is consistent (:func:`validate`: heads divide the hidden
sizes, rotary sections fit the head size, token ids inside the vocabulary). Pixel bounds are
checked against the decoder's positions and an estimate of the memory one image takes
(:func:`check_pixel_bounds`). Errors are :class:`ConfigError`, naming the file and the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass
class QwenVLConfig:
    family: str = "qwen2_5_vl"  # "qwen2_5_vl" | "qwen2_vl"
    # vision tower
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_intermediate: int = 3420
    vision_heads: int = 16
    vision_out: int = 2048  # merger output = text hidden size
    vision_act: str = "silu"  # silu (SwiGLU, 2.5-VL) | quick_gelu (fc1/fc2, 2-VL)
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # pixels; 2.5-VL only
    fullatt_blocks: tuple[int, ...] = (7, 15, 23, 31)  # 2.5-VL only; 2-VL attends fully everywhere
    vision_rope_theta: float = 10000.0
    tokens_per_second: float = 2.0  # 2.5-VL: M-RoPE time steps per second of video
    # text decoder
    vocab_size: int = 151936
    hidden: int = 2048
    intermediate: int = 11008
    layers: int = 36
    heads: int = 16
    kv_heads: int = 2
    rms_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = True
    # special tokens
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    max_positions: int = 128000  # the decoder's max_position_embeddings
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def is_v25(self) -> bool:
        return self.family == "qwen2_5_vl"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden // self.vision_heads

    @property
    def window_units(self) -> int:
        """Window side in merged units (2.5-VL: 112 px / 14 / 2 = 4)."""
        return self.window_size // self.patch_size // self.merge_size

    @classmethod
    def preset(cls, name: str, **overrides) -> "QwenVLConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf) -> "QwenVLConfig":
        """Build from a transformers Qwen2_5_VLConfig / Qwen2VLConfig."""
        v, t = hf.vision_config, hf.text_config
        family = hf.model_type
        if family not in ("qwen2_5_vl", "qwen2_vl"):
            raise ValueError(f"model_type {family!r} is not qwen2_5_vl or qwen2_vl")
        rope = dict(getattr(t, "rope_parameters", None) or {})
        section = rope.get("mrope_section") or (getattr(t, "rope_scaling", None) or {}).get("mrope_section")
        vrope = dict(getattr(v, "rope_parameters", None) or {})
        common = dict(
            family=family,
            vision_depth=v.depth,
            vision_heads=v.num_heads,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size,
            in_channels=getattr(v, "in_channels", 3),
            vision_rope_theta=float(vrope.get("rope_theta", 10000.0)),
            vocab_size=t.vocab_size,
            hidden=t.hidden_size,
            intermediate=t.intermediate_size,
            layers=t.num_hidden_layers,
            heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads or t.num_attention_heads,
            rms_eps=t.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", 1000000.0)),
            mrope_section=tuple(section or (16, 24, 24)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)
                                     or getattr(t, "tie_word_embeddings", False)),
            image_token_id=hf.image_token_id,
            video_token_id=hf.video_token_id,
            vision_start_token_id=hf.vision_start_token_id,
            vision_end_token_id=getattr(hf, "vision_end_token_id", 151653),
            max_positions=int(getattr(t, "max_position_embeddings", None) or 128000),
        )
        if family == "qwen2_5_vl":
            return cls(vision_hidden=v.hidden_size, vision_intermediate=v.intermediate_size,
                       vision_out=v.out_hidden_size, vision_act=v.hidden_act,
                       tokens_per_second=float(getattr(v, "tokens_per_second", 2)),
                       window_size=v.window_size, fullatt_blocks=tuple(v.fullatt_block_indexes),
                       **common)
        return cls(vision_hidden=v.embed_dim, vision_intermediate=int(v.embed_dim * v.mlp_ratio),
                   vision_out=v.hidden_size, vision_act=v.hidden_act, window_size=0,
                   fullatt_blocks=tuple(range(v.depth)), **common)


_TINY_TEXT = dict(vocab_size=320, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                  mrope_section=(2, 3, 3), tie_word_embeddings=False, image_token_id=268,
                  video_token_id=269, vision_start_token_id=265, vision_end_token_id=266)
_SMALL_TEXT = dict(vocab_size=320, hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2,
                   mrope_section=(8, 12, 12), tie_word_embeddings=False, image_token_id=268,
                   video_token_id=269, vision_start_token_id=265, vision_end_token_id=266)

PRESETS: dict[str, QwenVLConfig] = {
    # tests: seconds on a CPU
    "tiny": QwenVLConfig(vision_depth=4, vision_hidden=64, vision_intermediate=128, vision_heads=2,
                         vision_out=64, fullatt_blocks=(1, 3), **_TINY_TEXT),
    "tiny-qwen2-vl": QwenVLConfig(family="qwen2_vl", vision_depth=3, vision_hidden=64,
                                  vision_intermediate=128, vision_heads=2, vision_out=64,
                                  vision_act="quick_gelu", window_size=0, fullatt_blocks=(0, 1, 2),
                                  **_TINY_TEXT),
    # benchmarks: the small config of docs/architecture.md
    "small": QwenVLConfig(vision_depth=8, vision_hidden=256, vision_intermediate=512, vision_heads=4,
                          vision_out=256, fullatt_blocks=(3, 7), **_SMALL_TEXT),
    # released sizes (for shape checks; weights come from the checkpoint directory)
    "qwen2.5-vl-3b": QwenVLConfig(),
    "qwen2.5-vl-7b": QwenVLConfig(vision_out=3584, hidden=3584, intermediate=18944, layers=28,
                                  heads=28, kv_heads=4, tie_word_embeddings=False, vocab_size=152064),
    "qwen2-vl-2b": QwenVLConfig(family="qwen2_vl", vision_hidden=1280, vision_intermediate=5120,
                                vision_out=1536, vision_act="quick_gelu", window_size=0,
                                fullatt_blocks=tuple(range(32)), hidden=1536, intermediate=8960,
                                layers=28, heads=12, kv_heads=2),
}


# ------------------------------------------------------------------------------------ checks
class ConfigError(ValueError):
    """A checkpoint configuration that cannot be loaded: the text names the file and the field."""


CONFIG_BYTES = 1 << 20  # a config.json is a few KiB
# (lowest, highest) of config.json's integer sizes: the released models use at most a tenth of each
LIMITS = {
    "vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
    "max_position_embeddings": (1, 1 << 24),
    "vision_config.depth": (1, 1024), "vision_config.hidden_size": (1, 1 << 16),
    "vision_config.embed_dim": (1, 1 << 16), "vision_config.intermediate_size": (1, 1 << 18),
    "vision_config.num_heads": (1, 1024), "vision_config.out_hidden_size": (1, 1 << 16),
    "vision_config.patch_size": (1, 64), "vision_config.spatial_merge_size": (1, 8),
    "vision_config.temporal_patch_size": (1, 16), "vision_config.in_chans": (1, 4),
    "vision_config.in_channels": (1, 4), "vision_config.window_size": (0, 1 << 14),
    "vision_config.mlp_ratio": (1, 64),
}


def _field_problem(value, name: str, lo: int, hi: int) -> str | None:
    if name.endswith("mlp_ratio") and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} is {value!r}: not an integer"
    if not lo <= value <= hi:
        return f"{name} is {value}: outside [{lo}, {hi}]"
    return None


def check_config_dict(raw, source) -> None:
    """ConfigError unless config.json's values (``raw``, either layout) are of the right types and
    within :data:`LIMITS`; run before transformers parses the file."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: holds a JSON {type(raw).__name__}, not an object")
    if raw.get("model_type") not in ("qwen2_5_vl", "qwen2_vl"):
        raise ConfigError(f"{source}: model_type is {raw.get('model_type')!r}, not qwen2_5_vl or qwen2_vl")
    text = raw.get("text_config", {})
    vision = raw.get("vision_config")
    for name, part in (("text_config", text), ("vision_config", vision)):
        if not isinstance(part, dict):
            raise ConfigError(f"{source}: {name} is {type(part).__name__}, not an object")
    places = {"": {**raw, **text}, "vision_config.": vision}
    for key, (lo, hi) in LIMITS.items():
        prefix, _, name = key.rpartition(".")
        where = places[prefix + "." if prefix else ""]
        if name in where and where[name] is not None:
            problem = _field_problem(where[name], key, lo, hi)
            if problem:
                raise ConfigError(f"{source}: {problem}")
    _check_dtypes(places[""], source)


def _check_dtypes(text: dict, source) -> None:
    import torch

    for name in ("torch_dtype", "dtype"):
        value = text.get(name)
        if value is not None and not (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
            raise ConfigError(f"{source}: {name} is {value!r}, not a torch dtype (float32, bfloat16, float16)")


def validate(cfg: QwenVLConfig, source) -> QwenVLConfig:
    """``cfg`` when its sizes fit together as the model's layers need them; ConfigError naming
    the field otherwise."""
    checks = [
        (cfg.hidden % cfg.heads == 0, f"hidden_size {cfg.hidden} is not a multiple of num_attention_heads {cfg.heads}"),
        (cfg.heads % cfg.kv_heads == 0,
         f"num_attention_heads {cfg.heads} is not a multiple of num_key_value_heads {cfg.kv_heads}"),
        (len(cfg.mrope_section) == 3 and all(isinstance(n, int) and n > 0 for n in cfg.mrope_section)
         and 2 * sum(cfg.mrope_section) == cfg.head_dim,
         f"rope mrope_section {list(cfg.mrope_section)} must be three positive integers summing to head size / 2 "
         f"= {cfg.head_dim // 2}"),
        (cfg.vision_hidden % cfg.vision_heads == 0 and cfg.vision_head_dim % 4 == 0,
         f"vision_config: hidden size {cfg.vision_hidden} / num_heads {cfg.vision_heads} is not a multiple of 4"),
        (cfg.vision_out == cfg.hidden,
         f"vision_config: output size {cfg.vision_out} differs from the decoder's hidden_size {cfg.hidden}"),
        (cfg.vision_act == ("silu" if cfg.is_v25 else "quick_gelu"),
         f"vision_config.hidden_act is {cfg.vision_act!r}; {cfg.family} computes "
         f"{'silu' if cfg.is_v25 else 'quick_gelu'}"),
        (all(0 <= b < cfg.vision_depth for b in cfg.fullatt_blocks),
         f"vision_config.fullatt_block_indexes {list(cfg.fullatt_blocks)} are not all below depth {cfg.vision_depth}"),
        (not cfg.is_v25 or (cfg.window_size % (cfg.patch_size * cfg.merge_size) == 0 and cfg.window_units > 0),
         f"vision_config.window_size {cfg.window_size} is not a positive multiple of patch_size x "
         f"spatial_merge_size = {cfg.patch_size * cfg.merge_size}"),
        (cfg.vision_intermediate > 0, f"vision_config: intermediate size {cfg.vision_intermediate} is not positive"),
        (0 < cfg.rms_eps < 1, f"rms_norm_eps {cfg.rms_eps} is not in (0, 1)"),
        (math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0, f"rope_theta {cfg.rope_theta} is not positive"),
    ]
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    checks += [(isinstance(getattr(cfg, n), int) and 0 <= getattr(cfg, n) < cfg.vocab_size,
                f"{n} {getattr(cfg, n)!r} is not inside the vocabulary (vocab_size {cfg.vocab_size})") for n in ids]
    for ok, problem in checks:
        if not ok:
            raise ConfigError(f"{source}: {problem}")
    return cfg


def load_checked_config(path) -> tuple[dict, QwenVLConfig]:
    """(config.json as read, the checked QwenVLConfig) of a checkpoint directory: the file's
    values are bounded before transformers parses them, the parsed sizes checked to fit."""
    from transformers import AutoConfig

    source = Path(path) / "config.json"
    if not source.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json file)")
    if source.stat().st_size > CONFIG_BYTES:
        raise ConfigError(f"{source}: {source.stat().st_size} bytes, more than a config ({CONFIG_BYTES})")
    try:
        raw = json.loads(source.read_text())
    except ValueError as exc:
        raise ConfigError(f"{source}: not JSON ({exc})") from None
    check_config_dict(raw, source)
    hf = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    return raw, validate(QwenVLConfig.from_hf(hf), source)


# ------------------------------------------------------------------------------ pixel bounds
def image_bytes(cfg: QwenVLConfig, pixels: int, itemsize: int) -> int:
    """Estimated activation memory of one image of ``pixels`` (a lower estimate of the peak: the
    pixel patches in float32, the widest vision layer's activations, the decoder's key/value
    cache and widest activations for its tokens)."""
    patches = pixels // (cfg.patch_size ** 2)
    tokens = patches // (cfg.merge_size ** 2)
    patch_floats = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    vision = patches * (4 * patch_floats + itemsize * (7 * cfg.vision_hidden + 2 * cfg.vision_intermediate))
    kv = cfg.layers * 2 * cfg.kv_heads * cfg.head_dim
    decoder = tokens * itemsize * (kv + 5 * cfg.hidden + 2 * cfg.intermediate)
    return vision + decoder


def available_bytes(device) -> int | None:
    """Memory free for activations on ``device`` now (None: unknown)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def pixel_bounds_problem(cfg: QwenVLConfig, what: str, lo: int, hi: int, itemsize: int,
                         free: int | None) -> str | None:
    """Why a (min, max) pixel range cannot be used (None: it can): not 1 <= min <= max, more
    tokens per image (or per frame pair of a clip) than the decoder has positions, or an image
    at the bound that would need more memory than is free."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
        return f"{what} range [{lo}, {hi}] is not 1 <= min <= max"
    limit = cfg.max_positions * (cfg.patch_size * cfg.merge_size) ** 2
    for name, value in ((f"{what} min_pixels", lo), (f"{what} max_pixels", hi)):
        if value > limit:
            return (f"{name} {value} gives more tokens than the decoder's {cfg.max_positions} positions "
                    f"(at most {limit} pixels)")
        need = image_bytes(cfg, value, itemsize)
        if free is not None and need > free:
            return (f"{name} {value}: one image that size needs about {need / 2**30:.1f} GiB of activations, "
                    f"{free / 2**30:.1f} GiB are free")
    return None


def check_pixel_bounds(cfg: QwenVLConfig, proc, dtype, device) -> None:
    """ConfigError unless the processor's image and clip pixel bounds fit (:func:`pixel_bounds_problem`)."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    free = available_bytes(device)
    for what, lo, hi in (("image", proc.min_pixels, proc.max_pixels),
                         ("clip frame", proc.video_min_pixels, proc.video_max_pixels)):
        problem = pixel_bounds_problem(cfg, what, lo, hi, itemsize, free)
        if problem:
            raise ConfigError(f"model pixel bounds: {problem}")
