"""Batched Qwen2 decoder with M-RoPE and a fixed-shape KV cache.

Rows are left padded. Rotary embedding uses three position streams (t, h, w) chosen per
frequency by `mrope_section`; q/k rows are permuted at load time so it is one complex multiply.
The cache is preallocated as (layers, B, kv_heads, prompt + max_new_tokens, head_dim) and a
boolean key mask of fixed shape grows by one column per step, so decode steps have fixed shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QwenVLConfig
from .kernels import linear, linear_add
from .vision import apply_rope, interleave_perm


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

    def forward(self, x, rope, mask, cache=None, start: int = 0, pads=None):
        """x (B, L, D); rope (B, L, hd/2) complex; mask (B, 1, L, K) bool or None (causal).

        With `cache=(k_buf, v_buf)` the new keys/values are written at [start, start + L); a
        single-token step attends over the whole buffer (masked by `mask`). `pads` (host ints,
        left padding per row) runs the prefill causally per row on its real tokens instead of
        one masked call: half the attention work, since a mask hides the causal structure."""
        B, L, D = x.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        qkv = linear(F.rms_norm(x, (D,), self.norm1, self.eps), self.qkv.weight, self.qkv.bias)
        q = apply_rope(qkv[..., :H * hd].view(B, L, H, hd), rope[:, :, None])  # (B, L, H, hd)
        k = apply_rope(qkv[..., H * hd:(H + Hkv) * hd].view(B, L, Hkv, hd), rope[:, :, None])
        v = qkv[..., (H + Hkv) * hd:].view(B, L, Hkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, hd)
        if cache is not None:
            cache[0][:, :, start:start + L] = k
            cache[1][:, :, start:start + L] = v
            if L == 1:
                k, v = cache
        gqa = H != Hkv
        if pads is not None:
            o = q.new_zeros(B, H, L, hd)
            for b, p in enumerate(pads):
                o[b:b + 1, :, p:] = F.scaled_dot_product_attention(q[b:b + 1, :, p:], k[b:b + 1, :, p:],
                                                                   v[b:b + 1, :, p:], is_causal=True, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1,
                                               enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(B, L, H * hd)  # (B, L, H*hd)
        x = linear_add(o, self.o.weight, None, x)
        h = linear(F.rms_norm(x, (D,), self.norm2, self.eps), self.gate_up.weight)  # (B, L, 2I)
        I = h.shape[-1] // 2
        h = F.silu(h[..., :I], inplace=True).mul_(h[..., I:])
        return linear_add(h, self.down.weight, None, x)


class Decoder(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if sum(cfg.mrope_section) != cfg.head_dim // 2:
            raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("stream", torch.empty(cfg.head_dim // 2, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        cfg, hd, dev = self.cfg, self.cfg.head_dim, self.inv_freq.device
        if dev.type == "meta":
            return
        self.inv_freq = (1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))).to(dev)
        # which position stream (t, h, w) drives each rotary pair
        self.stream = torch.cat([torch.full((n,), i) for i, n in enumerate(cfg.mrope_section)]).to(dev)

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
        batch; with padding the CPU attends per row on real tokens, other devices use one masked
        call."""
        B, L, D = x.shape
        mask, rows = None, None
        if any(pads):
            if x.device.type == "cpu":
                rows = pads
            else:
                valid = attention_mask.bool()
                causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
                mask = causal & valid[:, None, None, :]  # (B, 1, L, L)
                mask |= torch.eye(L, dtype=torch.bool, device=x.device)  # pad rows attend to themselves
        rope = self.rope(position_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if caches is None else caches[i], 0, rows)
        return F.rms_norm(x, (D,), self.norm, self.cfg.rms_eps)

    def step(self, tok, position, key_mask, caches, index: int):
        """One decode step: tok (B,), position (B,), key_mask (B, 1, 1, K) -> last hidden (B, D)."""
        x = self.embed(tok)[:, None]  # (B, 1, D)
        rope = self.rope(position.view(1, -1, 1).expand(3, -1, 1))  # (B, 1, hd/2)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, key_mask, caches[i], index)
        return F.rms_norm(x[:, 0], (x.shape[-1],), self.norm, self.cfg.rms_eps)

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
