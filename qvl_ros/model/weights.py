"""The weights schema of a Qwen-VL checkpoint: every parameter's name and shape in the released
layout, and the mapping from transformers 5.x names to it. Pure; used by loading
(:mod:`.checkpoint`), the int4 formats (:mod:`.quant`) and the tiny checkpoint writer (:mod:`.tiny`)."""
from __future__ import annotations

from .config import QwenVLConfig

__all__ = ["expected_weights", "canonical_name"]


def expected_weights(cfg: QwenVLConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a checkpoint in the released layout."""
    Dv, Iv, P = cfg.vision_hidden, cfg.vision_intermediate, cfg.patch_size
    w: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (Dv, cfg.in_channels, cfg.temporal_patch_size, P, P)}
    for i in range(cfg.vision_depth):
        b = f"visual.blocks.{i}."
        w[b + "norm1.weight"] = (Dv,)
        w[b + "norm2.weight"] = (Dv,)
        if not cfg.is_v25:
            w[b + "norm1.bias"] = (Dv,)
            w[b + "norm2.bias"] = (Dv,)
        w[b + "attn.qkv.weight"] = (3 * Dv, Dv)
        w[b + "attn.qkv.bias"] = (3 * Dv,)
        w[b + "attn.proj.weight"] = (Dv, Dv)
        w[b + "attn.proj.bias"] = (Dv,)
        if cfg.is_v25:
            for n in ("gate_proj", "up_proj"):
                w[b + f"mlp.{n}.weight"] = (Iv, Dv)
                w[b + f"mlp.{n}.bias"] = (Iv,)
            w[b + "mlp.down_proj.weight"] = (Dv, Iv)
            w[b + "mlp.down_proj.bias"] = (Dv,)
        else:
            w[b + "mlp.fc1.weight"] = (Iv, Dv)
            w[b + "mlp.fc1.bias"] = (Iv,)
            w[b + "mlp.fc2.weight"] = (Dv, Iv)
            w[b + "mlp.fc2.bias"] = (Dv,)
    M = Dv * cfg.merge_size ** 2
    w["visual.merger.ln_q.weight"] = (Dv,)
    if not cfg.is_v25:
        w["visual.merger.ln_q.bias"] = (Dv,)
    w["visual.merger.mlp.0.weight"] = (M, M)
    w["visual.merger.mlp.0.bias"] = (M,)
    w["visual.merger.mlp.2.weight"] = (cfg.vision_out, M)
    w["visual.merger.mlp.2.bias"] = (cfg.vision_out,)
    D, I, hd = cfg.hidden, cfg.intermediate, cfg.head_dim
    w["model.embed_tokens.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.layers):
        b = f"model.layers.{i}."
        w[b + "self_attn.q_proj.weight"] = (cfg.heads * hd, D)
        w[b + "self_attn.q_proj.bias"] = (cfg.heads * hd,)
        for n in ("k_proj", "v_proj"):
            w[b + f"self_attn.{n}.weight"] = (cfg.kv_heads * hd, D)
            w[b + f"self_attn.{n}.bias"] = (cfg.kv_heads * hd,)
        w[b + "self_attn.o_proj.weight"] = (D, cfg.heads * hd)
        w[b + "mlp.gate_proj.weight"] = (I, D)
        w[b + "mlp.up_proj.weight"] = (I, D)
        w[b + "mlp.down_proj.weight"] = (D, I)
        w[b + "input_layernorm.weight"] = (D,)
        w[b + "post_attention_layernorm.weight"] = (D,)
    w["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = (cfg.vocab_size, D)
    return w


def canonical_name(name: str) -> str:
    """Map a transformers 5.x weight name to the released layout (identity for released names)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.lm_head."):
        return name[len("model."):]
    return name
