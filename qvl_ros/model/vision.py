"""Batched vision tower for Qwen2.5-VL (window + full attention) and Qwen2-VL (full attention).

All images of a batch, of any sizes, are concatenated into one packed sequence. Per layer there
is one attention call per distinct segment length (segments = windows, or whole images in
full-attention layers): segments of equal length are stacked as a batch, so a batch of frames
whose grid the window divides makes exactly one call per layer, and edge windows of other sizes
add at most three more. Index math (window order and its inverse, segment groups, rotary tables)
depends only on the images' grid shapes and is cached per tuple of grids.

Clips enter the same call: a clip of grid (t, h, w) is t slices that attend within themselves
(windows and full attention alike, as in the reference), each embedded from two frames by the
unfolded patch-embedding weights; slices of all images and clips share the packed sequence.

CPU cost is dominated by memory passes, so the layer is written to make few of them: the temporal
patch repeat is folded into the patch-embedding weights, q/k rows are permuted at load time so
rotary embedding is one complex multiply, gate and up projections are one matmul with an in-place
SwiGLU, residual adds and biases ride in the matmul output pass (see kernels.py), and no permute copies are made around attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch._dynamo.exc
import torch._inductor.exc
import torch.nn.functional as F
from torch import nn

from .config import QwenVLConfig
from .kernels import linear, linear_add


def interleave_perm(head_dim: int) -> torch.Tensor:
    """Row order that turns rotate-half pairs (i, i + d/2) into adjacent pairs (2i, 2i + 1)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)


def apply_rope(qk: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: qk (..., hd) real, rope (..., hd/2) complex broadcastable."""
    shape = qk.shape
    x = qk.float() if qk.dtype != torch.float32 else qk
    x = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (..., hd/2) complex
    out = torch.view_as_real(x * rope).flatten(-2)  # (..., hd)
    return out.to(qk.dtype).view(shape)


@dataclass
class Group:
    """Segments of one length L: tokens [start, start + n*L) when `index` is None, else `index`."""
    n: int
    length: int
    start: int
    index: torch.Tensor | None


@dataclass
class Layout:
    unit_perm: torch.Tensor      # (U,) source unit of each window-order position; gather on inputs
    unit_inv: torch.Tensor       # (U,) window-order position of each output unit (entry order)
    rope: torch.Tensor           # (S, hd/2) complex64, in window order
    window_groups: list          # [Group] for window-attention layers
    full_groups: list            # [Group] for full-attention layers
    units: list                  # merged tokens per image


def _group(segments: list[tuple[int, int]], device) -> list[Group]:
    by_len: dict[int, list[int]] = {}
    for start, length in segments:
        by_len.setdefault(length, []).append(start)
    groups = []
    for length, starts in by_len.items():
        contiguous = all(b - a == length for a, b in zip(starts, starts[1:]))
        index = None
        if not contiguous:
            index = (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).reshape(-1).to(device)
        groups.append(Group(len(starts), length, starts[0], index))
    return groups


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) without the gain (it is folded into the next linear): two passes over x."""
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
    r = torch.rsqrt(ss.square_().div_(x.shape[-1]).add_(eps))
    return x * r.to(x.dtype)


class Norm(nn.Module):
    """RMSNorm (Qwen2.5-VL) or LayerNorm (Qwen2-VL), eps 1e-6.

    In float32 the gain (and LayerNorm bias) is folded into the linear layer that follows
    (`fold_into`), which saves a pass over the activations. In lower precision the residual
    stream stays float32 and the norm, gain included, runs in float32 and rounds once to the
    weights' dtype for the matmul that follows."""

    def __init__(self, rms: bool, dim: int, eps: float = 1e-6):
        super().__init__()
        self.rms, self.eps, self.folded = rms, eps, False
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        """x (..., D) in float32 -> normalized, in the weights' dtype."""
        if self.folded:
            if self.rms:
                return rms_scale(x, self.eps)
            return F.layer_norm(x, x.shape[-1:], None, None, self.eps)
        w, b = self.weight.float(), None if self.bias is None else self.bias.float()
        if self.rms:
            return F.rms_norm(x.float(), x.shape[-1:], w, self.eps).to(self.weight.dtype)
        return F.layer_norm(x.float(), x.shape[-1:], w, b, self.eps).to(self.weight.dtype)

    @torch.no_grad()
    def fold_into(self, layer: nn.Linear, groups: int = 1) -> None:
        """layer(g * x + s) == layer'(x): scale input columns by g, move W @ s into the bias.

        `groups` > 1 repeats the gain over a reshaped input (merger: norm over D, linear over m*m*D)."""
        g = self.weight.float().repeat(groups)
        if self.bias is not None:
            extra = layer.weight.float() @ self.bias.float().repeat(groups)
            layer.bias.add_(extra.to(layer.bias.dtype))
        layer.weight.mul_(g.to(layer.weight.dtype))
        self.folded = True


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        D, I = cfg.vision_hidden, cfg.vision_intermediate
        self.heads, self.hd = cfg.vision_heads, cfg.vision_head_dim
        self.swiglu = cfg.is_v25
        self.norm1 = Norm(cfg.is_v25, D)
        self.norm2 = Norm(cfg.is_v25, D)
        self.qkv = nn.Linear(D, 3 * D)  # q and k rows interleaved per head (see interleave_perm)
        self.proj = nn.Linear(D, D)
        self.up = nn.Linear(D, 2 * I if self.swiglu else I)  # [gate; up] for SwiGLU, fc1 otherwise
        self.down = nn.Linear(I, D)

    def attention(self, x: torch.Tensor, rope: torch.Tensor, groups: list) -> torch.Tensor:
        S, D = x.shape
        H, hd = self.heads, self.hd
        qkv = linear(x, self.qkv.weight, self.qkv.bias).view(S, 3, H, hd)  # (S, 3, H, hd)
        qk = apply_rope(qkv[:, :2], rope[:, None, None, :])  # (S, 2, H, hd)
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]  # (S, H, hd) each
        if len(groups) == 1 and groups[0].index is None and groups[0].n * groups[0].length == S:
            g = groups[0]
            o = F.scaled_dot_product_attention(*(t.view(g.n, g.length, H, hd).transpose(1, 2) for t in (q, k, v)))
            return o.transpose(1, 2).reshape(S, D)  # (n, H, L, hd) -> (S, D)
        out = x.new_empty(S, H, hd)
        for g in groups:
            if g.index is None:
                sl = slice(g.start, g.start + g.n * g.length)
                qg, kg, vg = (t[sl].view(g.n, g.length, H, hd).transpose(1, 2) for t in (q, k, v))
            else:
                qg, kg, vg = (t.index_select(0, g.index).view(g.n, g.length, H, hd).transpose(1, 2)
                              for t in (q, k, v))
            o = F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(-1, H, hd)  # (n*L, H, hd)
            if g.index is None:
                out[sl] = o
            else:
                out.index_copy_(0, g.index, o)
        return out.view(S, D)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, groups: list) -> torch.Tensor:
        o = self.attention(self.norm1(x), rope, groups)
        x = linear_add(o, self.proj.weight, self.proj.bias, x)
        h = linear(self.norm2(x), self.up.weight, self.up.bias)
        if self.swiglu:
            I = h.shape[-1] // 2
            gate, up = h[:, :I], h[:, I:]
            h = F.silu(gate, inplace=True).mul_(up)  # (S, I) strided view, no copy
        else:
            h = h.mul_(torch.sigmoid(1.702 * h))  # quick_gelu
        return linear_add(h, self.down.weight, self.down.bias, x)


_COMPILED_BLOCKS: dict = {}  # backend -> torch.compile(VisionBlock.forward), shared by all blocks and towers
# what a failed compilation raises: dynamo and the backends it wraps (Triton missing, inductor), the C++/CUDA compilers
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError)


class VisionTower(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        D, m = cfg.vision_hidden, cfg.merge_size
        self.patch_embed = nn.Linear(cfg.in_channels * cfg.patch_size ** 2, D, bias=False)  # stills: T folded
        self.patch_embed_clip = nn.Linear(cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2, D,
                                          bias=False)  # clips: (C, T, p, p) rows
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vision_depth))
        self.merger_norm = Norm(cfg.is_v25, D)
        self.merger_fc1 = nn.Linear(D * m * m, D * m * m)
        self.merger_fc2 = nn.Linear(D * m * m, cfg.vision_out)
        self.register_buffer("inv_freq", torch.empty(cfg.vision_head_dim // 4), persistent=False)
        self.reset_buffers()

    def compile_blocks(self, enable: bool = True, backend: str | Callable = "inductor") -> None:
        """Run the blocks through torch.compile (fixed shapes: one compiled graph per grid layout
        and attention kind, cached by torch). Fuses norms, rotary, SwiGLU and residual adds into
        a few kernels on CUDA; on the CPU the eager blocks are faster, so they stay eager there.

        A layout whose compilation fails (COMPILE_ERRORS) runs eagerly from then on, with a
        warning naming it, and is counted in `compile_failures`; other errors propagate."""
        if enable and backend not in _COMPILED_BLOCKS:
            _COMPILED_BLOCKS[backend] = torch.compile(VisionBlock.forward, dynamic=False, backend=backend)
        self._block_fn = _COMPILED_BLOCKS[backend] if enable else VisionBlock.forward
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        if enable and getattr(torch._dynamo.config, limit) < 64:  # layouts x (window, full) attention
            setattr(torch._dynamo.config, limit, 64)

    @property
    def compiled(self) -> bool:
        return self._block_fn is not VisionBlock.forward

    def reset_buffers(self) -> None:
        self._block_fn = getattr(self, "_block_fn", VisionBlock.forward)
        self._eager_layouts: set = getattr(self, "_eager_layouts", set())  # layouts whose compile failed
        self.compile_failures: list = getattr(self, "compile_failures", [])  # (layout key, error) per failure
        self._reset_rotary()

    def _reset_rotary(self) -> None:
        """inv_freq in float32 on the weights' device, whatever their dtype (as transformers keeps it);
        drops the cached layouts, whose rotary tables derive from it."""
        self._layouts: dict[tuple, Layout] = {}
        dev = self.patch_embed.weight.device
        if dev.type == "meta":
            return
        hd = self.cfg.vision_head_dim
        inv = 1.0 / (self.cfg.vision_rope_theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float32) / (hd // 2)))
        self.inv_freq = inv.to(dev)  # (hd/4,) float32, computed as transformers does

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.cuda()`, `to_empty` cast or move the buffers; the rotary frequencies are
        then computed again in float32 instead of keeping a rounded copy."""
        super()._apply(fn, recurse)
        self._reset_rotary()
        return self

    # -------------------------------------------------------------- index math (per grid shape)
    def _image_layout(self, gh: int, gw: int):
        """Window order of one image's merge units, its window lengths (units), and (h, w) per patch."""
        cfg, m = self.cfg, self.cfg.merge_size
        H, W = gh // m, gw // m
        units = torch.arange(H * W).view(H, W)
        if cfg.is_v25:
            ws = cfg.window_units
            nh, nw = -(-H // ws), -(-W // ws)
            order, lengths = [], []
            for i in range(nh):
                for j in range(nw):
                    blk = units[i * ws:(i + 1) * ws, j * ws:(j + 1) * ws].reshape(-1)
                    order.append(blk)
                    lengths.append(blk.numel())
            order = torch.cat(order)
        else:
            order, lengths = units.reshape(-1), [H * W]
        # patch coordinates in raster-of-merge-units order: unit (uh, uw), inner (ih, iw)
        uh = torch.arange(H).view(H, 1, 1, 1).expand(H, W, m, m)
        uw = torch.arange(W).view(1, W, 1, 1).expand(H, W, m, m)
        ih = torch.arange(m).view(1, 1, m, 1).expand(H, W, m, m)
        iw = torch.arange(m).view(1, 1, 1, m).expand(H, W, m, m)
        hpos = (uh * m + ih).reshape(H * W, m * m)  # (units, m*m)
        wpos = (uw * m + iw).reshape(H * W, m * m)
        return order, lengths, hpos, wpos

    def layout(self, grids: list, clips: list | None = None) -> Layout:
        """Index math for entries with `grids` [(t, gh, gw)]; `clips[i]` marks entry i as a clip.

        Outputs come in entry order (raster order of merge units, clips slice by slice). Inputs
        come in source order: the rows of all still images, then the rows of all clips."""
        clips = tuple(bool(c) for c in clips) if clips else (False,) * len(grids)
        key = (tuple(grids), clips, self.inv_freq.device)
        lay = self._layouts.get(key)
        if lay is not None:
            return lay
        mm = self.cfg.merge_size ** 2
        sizes = [t * gh * gw // mm for t, gh, gw in grids]
        src = [0, sum(n for n, c in zip(sizes, clips) if not c)]  # next source unit: [stills, clips]
        perms, sources, wsegs, fsegs, hs, ws_, units = [], [], [], [], [], [], []
        u0 = 0
        for (t, gh, gw), clip, n_units in zip(grids, clips, sizes):
            if t != 1 and not clip:
                raise ValueError("an image grid must have t = 1; clips are marked in `clips`")
            order, lengths, hpos, wpos = self._image_layout(gh, gw)
            n = order.numel()
            sources.append(torch.arange(n_units) + src[clip])
            src[clip] += n_units
            for _ in range(t):  # each temporal slice attends within itself
                perms.append(order + u0)
                hs.append(hpos[order].reshape(-1))
                ws_.append(wpos[order].reshape(-1))
                start = u0 * mm
                for length in lengths:
                    wsegs.append((start, length * mm))
                    start += length * mm
                fsegs.append((u0 * mm, n * mm))
                u0 += n
            units.append(n_units)
        dev = self.inv_freq.device
        window = torch.cat(perms)  # entry-order unit at each window position
        inv = torch.empty_like(window)
        inv[window] = torch.arange(window.numel())
        perm = torch.cat(sources)[window]  # source unit at each window position
        h, w = torch.cat(hs).to(dev), torch.cat(ws_).to(dev)
        angles = torch.cat([h[:, None].float() * self.inv_freq, w[:, None].float() * self.inv_freq], dim=-1)
        rope = torch.polar(torch.ones_like(angles), angles)  # (S, hd/2) complex
        wgroups = _group(wsegs, dev) if self.cfg.is_v25 else _group(fsegs, dev)
        lay = Layout(perm.to(dev), inv.to(dev), rope, wgroups, _group(fsegs, dev), units)
        if len(self._layouts) > 64:
            self._layouts.clear()
        self._layouts[key] = lay
        return lay

    # -------------------------------------------------------------- forward
    def forward(self, pixels: torch.Tensor, grids: list, clip_pixels: torch.Tensor | None = None,
                clips: list | None = None) -> torch.Tensor:
        """Merged tokens (U, out) in entry order.

        pixels (P, C*p*p): still images' rows in raster patch order; clip_pixels (Pv, C*T*p*p):
        clips' rows (t-major, raster within a slice); `clips[i]` marks entry i as a clip."""
        lay = self.layout(grids, clips)
        mm = self.cfg.merge_size ** 2
        wdt = self.patch_embed.weight.dtype
        if clip_pixels is None or not clip_pixels.shape[0]:
            P, K = pixels.shape
            x = pixels.to(wdt).view(P // mm, mm, K)[lay.unit_perm].view(P, K)
            x = linear(x, self.patch_embed.weight)  # (S, D), window order
        else:
            parts = [linear(pixels.to(wdt), self.patch_embed.weight)] if pixels.shape[0] else []
            parts.append(linear(clip_pixels.to(wdt), self.patch_embed_clip.weight))
            x = torch.cat(parts) if len(parts) > 1 else parts[0]  # (S, D), source order
            S, D = x.shape
            x = x.view(S // mm, mm, D)[lay.unit_perm].view(S, D)  # window order
        x = x.float()  # the residual stream is float32 (a no-op for float32 weights)
        P = x.shape[0]
        x = self._blocks(x, lay, (tuple(grids), tuple(clips or ())))
        x = self.merger_norm(x).view(P // mm, -1)  # (U, mm*D)
        x = F.gelu(linear(x, self.merger_fc1.weight, self.merger_fc1.bias))
        x = linear(x, self.merger_fc2.weight, self.merger_fc2.bias)  # (U, out)
        return x[lay.unit_inv]

    def _blocks(self, x: torch.Tensor, lay: Layout, key: tuple) -> torch.Tensor:
        """All blocks, compiled where they compile for this layout, else eagerly (see compile_blocks)."""
        fn = VisionBlock.forward if key in self._eager_layouts else self._block_fn
        try:
            return self._run_blocks(fn, x, lay)
        except COMPILE_ERRORS as exc:
            if fn is VisionBlock.forward:
                raise
            import warnings

            self._eager_layouts.add(key)
            self.compile_failures.append((key, f"{type(exc).__name__}: {exc}"))
            warnings.warn(f"torch.compile of the vision blocks failed for grids {key[0]}, running that layout "
                          f"eagerly: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return self._run_blocks(VisionBlock.forward, x, lay)

    def _run_blocks(self, fn, x: torch.Tensor, lay: Layout) -> torch.Tensor:
        full = set(self.cfg.fullatt_blocks)
        for i, blk in enumerate(self.blocks):
            x = fn(blk, x, lay.rope, lay.full_groups if i in full else lay.window_groups)
        return x

    # -------------------------------------------------------------- weights
    @torch.no_grad()
    def load(self, w: dict[str, torch.Tensor]) -> None:
        """Copy released-layout weights (`visual.*`) into this module, fusing and permuting rows."""
        cfg = self.cfg
        pe = w["visual.patch_embed.proj.weight"]  # (D, C, T, p, p)
        self.patch_embed.weight.copy_(pe.float().sum(2).reshape(pe.shape[0], -1))
        self.patch_embed_clip.weight.copy_(pe.reshape(pe.shape[0], -1))  # (D, C*T*p*p)
        hd, D = cfg.vision_head_dim, cfg.vision_hidden
        perm = interleave_perm(hd)
        qk_rows = torch.cat([(perm + h * hd) for h in range(2 * cfg.vision_heads)])  # q then k heads
        rows = torch.cat([qk_rows, torch.arange(2 * D, 3 * D)])
        for i, blk in enumerate(self.blocks):
            b = f"visual.blocks.{i}."
            blk.qkv.weight.copy_(w[b + "attn.qkv.weight"][rows])
            blk.qkv.bias.copy_(w[b + "attn.qkv.bias"][rows])
            blk.proj.weight.copy_(w[b + "attn.proj.weight"])
            blk.proj.bias.copy_(w[b + "attn.proj.bias"])
            if cfg.is_v25:
                blk.up.weight.copy_(torch.cat([w[b + "mlp.gate_proj.weight"], w[b + "mlp.up_proj.weight"]]))
                blk.up.bias.copy_(torch.cat([w[b + "mlp.gate_proj.bias"], w[b + "mlp.up_proj.bias"]]))
                blk.down.weight.copy_(w[b + "mlp.down_proj.weight"])
                blk.down.bias.copy_(w[b + "mlp.down_proj.bias"])
            else:
                blk.up.weight.copy_(w[b + "mlp.fc1.weight"])
                blk.up.bias.copy_(w[b + "mlp.fc1.bias"])
                blk.down.weight.copy_(w[b + "mlp.fc2.weight"])
                blk.down.bias.copy_(w[b + "mlp.fc2.bias"])
            for norm, name in ((blk.norm1, "norm1"), (blk.norm2, "norm2")):
                norm.weight.copy_(w[b + name + ".weight"])
                if norm.bias is not None:
                    norm.bias.copy_(w[b + name + ".bias"])
        self.merger_fc1.weight.copy_(w["visual.merger.mlp.0.weight"])
        self.merger_fc1.bias.copy_(w["visual.merger.mlp.0.bias"])
        self.merger_norm.weight.copy_(w["visual.merger.ln_q.weight"])
        if self.merger_norm.bias is not None:
            self.merger_norm.bias.copy_(w["visual.merger.ln_q.bias"])
        self.merger_fc2.weight.copy_(w["visual.merger.mlp.2.weight"])
        self.merger_fc2.bias.copy_(w["visual.merger.mlp.2.bias"])

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Fold every norm's gain into the linear after it (float32 weights; see `Norm`)."""
        for blk in self.blocks:
            blk.norm1.fold_into(blk.qkv)
            blk.norm2.fold_into(blk.up)
        self.merger_norm.fold_into(self.merger_fc1, groups=self.cfg.merge_size ** 2)
