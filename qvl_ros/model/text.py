"""Batched Qwen2 decoder with M-RoPE and a fixed-shape KV cache.

Rows are left padded. Rotary embedding uses three position streams (t, h, w) chosen per
frequency by `mrope_section`; q/k rows are permuted at load time so it is one complex multiply.
The prefill writes the cache's first L columns; each decode step (`step`, state in token_steps.py)
writes one column at a position held in a device tensor and attends over the whole fixed-length
cache under a boolean key mask, so all steps have the same shapes and no host value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QwenVLConfig
from .kernels import linear, linear_add
from .vision import apply_rope, interleave_perm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the float32 residual stream x (..., D), gain included, rounded once to the
    weight's dtype (the dtype of the matmul that follows)."""
    return F.rms_norm(x, x.shape[-1:], weight.float(), eps).to(weight.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        D, hd = cfg.hidden, cfg.head_dim
        self.H, self.Hkv, self.hd, self.eps = cfg.heads, cfg.kv_heads, hd, cfg.rms_eps
        self.norm1 = nn.Parameter(torch.ones(D))
        self.norm2 = nn.Parameter(torch.ones(D))
        self.qkv = nn.Linear(D, (cfg.heads + 2 * cfg.kv_heads) * hd)  # q, k rows interleaved per head
        self.o = nn.Linear(cfg.heads * hd, D, bias=False)
        self.gate_up = nn.Linear(D, 2 * cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, D, bias=False)

    def project(self, x: torch.Tensor, rope: torch.Tensor):
        """x (B, L, D) -> q (B, L, H, hd), k, v (B, L, Hkv, hd), rotary applied to q and k."""
        B, L, D = x.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        qkv = linear(rms_norm(x, self.norm1, self.eps), self.qkv.weight, self.qkv.bias)
        q = apply_rope(qkv[..., :H * hd].view(B, L, H, hd), rope[:, :, None])  # (B, L, H, hd)
        k = apply_rope(qkv[..., H * hd:(H + Hkv) * hd].view(B, L, Hkv, hd), rope[:, :, None])
        v = qkv[..., (H + Hkv) * hd:].view(B, L, Hkv, hd)
        return q, k, v

    def mlp(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Output projection of attention `o` (B, L, H*hd) + residual, then the SwiGLU block."""
        x = linear_add(o, self.o.weight, None, x)
        h = linear(rms_norm(x, self.norm2, self.eps), self.gate_up.weight)  # (B, L, 2I)
        I = h.shape[-1] // 2
        h = F.silu(h[..., :I], inplace=True).mul_(h[..., I:])
        return linear_add(h, self.down.weight, None, x)

    def forward(self, x, rope, mask, cache=None, pads=None):
        """Prefill: x (B, L, D); rope (B, L, hd/2) complex; mask (B, 1, L, L) bool or None (causal).

        With `cache=(k_buf, v_buf)` the keys/values are written at columns [0, L). `pads` (host
        ints, left padding per row) runs the prefill causally per row on its real tokens instead
        of one masked call: half the attention work, since a mask hides the causal structure."""
        B, L, D = x.shape
        H, hd = self.H, self.hd
        q, k, v = (t.transpose(1, 2) for t in self.project(x, rope))  # (B, heads, L, hd)
        if cache is not None:
            cache[0][:, :, :L] = k
            cache[1][:, :, :L] = v
        gqa = H != self.Hkv
        if pads is not None:
            o = q.new_zeros(B, H, L, hd)
            for b, p in enumerate(pads):
                o[b:b + 1, :, p:] = F.scaled_dot_product_attention(q[b:b + 1, :, p:], k[b:b + 1, :, p:],
                                                                   v[b:b + 1, :, p:], is_causal=True, enable_gqa=gqa)
        elif mask is not None and gqa:
            # a boolean mask with enable_gqa rules out the flash and memory-efficient kernels (math
            # attention); with k/v expanded to the query heads the memory-efficient kernel takes it
            rep = H // self.Hkv
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                               attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1,
                                               enable_gqa=gqa)
        return self.mlp(x, o.transpose(1, 2).reshape(B, L, H * hd))  # (B, L, H*hd)

    def decode(self, x, rope, key_mask, cache, cache_pos):
        """One token per row: x (B, 1, D); keys/values written at column `cache_pos` (1,) of the
        fixed-length cache, attention over all K columns under `key_mask` (B, 1, 1, K)."""
        B = x.shape[0]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        q, k, v = self.project(x, rope)
        cache[0].index_copy_(2, cache_pos, k.transpose(1, 2))  # (B, Hkv, 1, hd) into (B, Hkv, K, hd)
        cache[1].index_copy_(2, cache_pos, v.transpose(1, 2))
        # query heads grouped by the key/value head they share: (B, 1, H, hd) -> (B, Hkv, H/Hkv, hd)
        o = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, hd), cache[0], cache[1], attn_mask=key_mask)
        return self.mlp(x, o.reshape(B, 1, H * hd))  # (B, Hkv, H/Hkv, hd) -> (B, 1, H*hd)


class TextModel(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if sum(cfg.mrope_section) != cfg.head_dim // 2:
            raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
        self.per_row_prefill: bool | None = None  # padded prefill per row (None: on the CPU) or one masked call
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("stream", torch.empty(cfg.head_dim // 2, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """inv_freq in float32 on the weights' device, whatever their dtype (as transformers keeps
        it: a bfloat16 copy turns the angle at position p into p times a rounded frequency), and
        the rotary pairs' position streams."""
        cfg, hd, dev = self.cfg, self.cfg.head_dim, self.embed.weight.device
        if dev.type == "meta":
            return
        self.inv_freq = (1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))).to(dev)
        # which position stream (t, h, w) drives each rotary pair
        self.stream = torch.cat([torch.full((n,), i) for i, n in enumerate(cfg.mrope_section)]).to(dev)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.cuda()`, `to_empty` cast or move the buffers; the rotary frequencies are
        then computed again in float32 instead of keeping a rounded copy."""
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def rope(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (3, B, L) -> (B, L, hd/2) complex rotations."""
        pos = position_ids.float()[..., None] * self.inv_freq  # (3, B, L, hd/2)
        idx = self.stream.view(1, 1, 1, -1).expand(1, *pos.shape[1:])
        angles = pos.gather(0, idx)[0]  # (B, L, hd/2)
        return torch.polar(torch.ones_like(angles), angles)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear(h, w)

    def forward(self, x, position_ids, attention_mask, pads: list[int], caches=None):
        """Prefill: x (B, L, D) embeddings -> last hidden states (B, L, D) after the final norm.

        `pads` (host ints) is each row's left padding. Without padding one causal call serves the
        batch; with padding the CPU attends per row on real tokens (`per_row_prefill`, default on
        the CPU), other devices use one masked call with k/v expanded to the query heads."""
        B, L, D = x.shape
        mask, rows = None, None
        if any(pads):
            per_row = x.device.type == "cpu" if self.per_row_prefill is None else self.per_row_prefill
            if per_row:
                rows = pads
            else:
                valid = attention_mask.bool()
                causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
                mask = causal & valid[:, None, None, :]  # (B, 1, L, L)
                mask |= torch.eye(L, dtype=torch.bool, device=x.device)  # pad rows attend to themselves
        rope = self.rope(position_ids)
        x = x.float()  # residual stream in float32 (a no-op in float32)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if caches is None else caches[i], rows)
        return rms_norm(x, self.norm, self.cfg.rms_eps)

    def step(self, st) -> torch.Tensor:
        """One decode step on a `DecodeState`: feeds st.tok at st.position, writes its keys/values
        at column st.cache_pos, advances both; returns logits (B, V). Only in-place tensor ops on
        fixed shapes, so it can be captured in a CUDA graph."""
        st.key_mask.index_fill_(3, st.cache_pos, True)
        x = self.embed(st.tok)[:, None].float()  # (B, 1, D), residual stream in float32
        angles = st.position.float()[:, None, None] * self.inv_freq  # (B, 1, hd/2): t = h = w for text
        rope = torch.polar(torch.ones_like(angles), angles)
        for layer, cache in zip(self.layers, st.caches):
            x = layer.decode(x, rope, st.key_mask, cache, st.cache_pos)
        st.position.add_(1)
        st.cache_pos.add_(1)
        return self.logits(rms_norm(x[:, 0], self.norm, self.cfg.rms_eps))

    @torch.no_grad()
    def load(self, w: dict[str, torch.Tensor]) -> None:
        """Copy released-layout weights in; a fused linear that is not an nn.Linear (a 4-bit one,
        see quant.py, or None until it is attached) is left to its own loader."""
        fused = fused_linears(self.cfg)
        self.embed.weight.copy_(w["model.embed_tokens.weight"])
        self.norm.copy_(w["model.norm.weight"])
        if self.lm_head is not None:
            self.lm_head.weight.copy_(w["lm_head.weight"])
        for i, layer in enumerate(self.layers):
            b = f"model.layers.{i}."
            for name, parts in fused.items():
                lin = getattr(layer, name)
                if not isinstance(lin, nn.Linear):
                    continue
                lin.weight.copy_(torch.cat([take_rows(w[b + p + ".weight"], rows) for p, rows in parts]))
                if lin.bias is not None:
                    lin.bias.copy_(torch.cat([take_rows(w[b + p + ".bias"], rows) for p, rows in parts]))
            layer.norm1.copy_(w[b + "input_layernorm.weight"])
            layer.norm2.copy_(w[b + "post_attention_layernorm.weight"])


def fused_linears(cfg: QwenVLConfig) -> dict[str, list[tuple[str, torch.Tensor | None]]]:
    """How each fused linear of a decoder layer stacks released ones along its output rows:
    name -> [(released module under model.layers.{i}., the rows it takes in order, or None for all)].
    q and k rows are reordered per head so that rotary pairs are adjacent (see apply_rope)."""
    hd = cfg.head_dim
    perm = interleave_perm(hd)
    q_rows = torch.cat([perm + h * hd for h in range(cfg.heads)])
    k_rows = torch.cat([perm + h * hd for h in range(cfg.kv_heads)])
    return {"qkv": [("self_attn.q_proj", q_rows), ("self_attn.k_proj", k_rows), ("self_attn.v_proj", None)],
            "o": [("self_attn.o_proj", None)],
            "gate_up": [("mlp.gate_proj", None), ("mlp.up_proj", None)],
            "down": [("mlp.down_proj", None)]}


def take_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """t's rows in the order `rows` gives (all of them when None)."""
    return t if rows is None else t[rows]


def __getattr__(name: str):
    if name == "Decoder":  # the old name of TextModel
        import warnings

        warnings.warn("qvl_ros.model.text.Decoder is now TextModel", DeprecationWarning, stacklevel=2)
        return TextModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
