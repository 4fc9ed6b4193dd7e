"""One flat configuration for Qwen2.5-VL and Qwen2-VL, with named presets.

`QwenVLConfig.from_hf(hf_config)` reads a transformers config (old flat release layout or the
nested 5.x layout, both normalized by transformers' AutoConfig); presets cover the tiny test
model, the CPU benchmark model and the released sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


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
