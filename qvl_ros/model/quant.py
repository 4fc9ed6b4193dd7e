"""4-bit checkpoints: AWQ (gemm) and GPTQ releases, run on torch's own int4 kernels.

Both formats store a linear's weight W (out, in) as 4-bit integers q, per-group integer zero points
z and float scales s, groups running along the input dimension:

    W[o, i] = (q[o, i] - z[g(i), o]) * s[g(i), o]

AWQ, version "gemm" (g(i) = i // group_size):
    qweight int32 (in, out/8)        eight output channels per word: nibble n (bits 4n..4n+3)
                                     holds channel 8c + AWQ_ORDER[n]
    qzeros  int32 (in/group, out/8)  the zero points, packed the same way
    scales  float (in/group, out)
GPTQ (g(i) = g_idx[i]; without act order g_idx[i] = i // group_size; group_size -1: one group):
    qweight int32 (in/8, out)        eight input rows per word: nibble n holds row 8r + n
    qzeros  int32 (groups, out/8)    eight output channels per word: nibble n holds channel 8c + n;
                                     checkpoint_format "gptq" (v1, the released one) stores z - 1,
                                     "gptq_v2" stores z
    scales  float (groups, out);  g_idx int32 (in,): the group of each input row (act order
                                     permutes it: desc_act)

torch's int4 kernels (`_weight_int4pack_mm` on CUDA sm80+, `_weight_int4pack_mm_for_cpu` on the
CPU) compute x @ W.T with W[o, k] = (q - 8) * scale + zero per group of contiguous input rows,
so the loader stores zero = (8 - z) * s, sorts act-order rows once so that groups are contiguous
(the input columns are gathered to match on each call), and repacks into the kernel's layout.
The int4 linears compute in bfloat16 by default on both devices: inputs are cast to bfloat16 and
outputs back to the model dtype (the rest of the model keeps its dtype). The CUDA kernel takes only bfloat16;
the CPU kernel also takes float32 and float16, but only its bfloat16 path is vectorized (AVX2
here: float32 runs 8x slower than a dense float32 linear, bfloat16 up to 13x faster at batch 1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .weights import expected_weights

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output channel (within its 8) held by each nibble of an AWQ word
KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4 kernels take
SUPPORTED = ("supported: AWQ (version gemm, 4-bit, zero point) and GPTQ (4-bit, symmetric or not, desc_act "
             "with g_idx, checkpoint_format gptq or gptq_v2)")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class QuantConfig:
    method: str  # "awq" | "gptq"
    group_size: int  # input rows per group; -1 (GPTQ): one group for all rows
    zero_offset: int = 0  # added to stored zero points: 1 for GPTQ v1
    desc_act: bool = False
    sym: bool = True

    @classmethod
    def from_checkpoint(cls, raw: dict, where) -> "QuantConfig | None":
        """The quantization of a checkpoint from its config.json dict; None for a float one.
        Anything but 4-bit AWQ gemm / GPTQ is refused with a ValueError naming what was found."""
        q = raw.get("quantization_config")
        if not q:
            return None
        method = str(q.get("quant_method", "?")).lower()
        bits = q.get("bits", q.get("w_bit"))
        gs = int(q.get("group_size", q.get("q_group_size", 128)))
        if method not in ("awq", "gptq"):
            raise ValueError(f"{where}: quantization method {method!r} is not supported; {SUPPORTED}")
        if bits != 4:
            raise ValueError(f"{where}: {method} checkpoint with {bits}-bit weights is not supported; {SUPPORTED}")
        if method == "awq":
            version = str(q.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"{where}: AWQ version {version!r} is not supported; {SUPPORTED}")
            if not q.get("zero_point", True):
                raise ValueError(f"{where}: AWQ without zero point is not supported; {SUPPORTED}")
            if gs <= 0:
                raise ValueError(f"{where}: AWQ group_size {gs} is not supported; it must be positive")
            return cls("awq", gs)
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; {SUPPORTED}")
        if gs <= 0 and gs != -1:
            raise ValueError(f"{where}: GPTQ group_size {gs} is not supported; it must be positive or -1")
        return cls("gptq", gs, 1 if fmt == "gptq" else 0, bool(q.get("desc_act", False)), bool(q.get("sym", True)))


# ----------------------------------------------------------------------------- stored form
def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words (...) -> uint8 (..., 8): nibble n is bits 4n..4n+3."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def words(nib: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles (..., 8) in 0..15 -> int32 words (...): the inverse of `nibbles`."""
    w = (nib.to(torch.int64) << torch.arange(0, 32, 4)).sum(-1)  # (...) in [0, 2^32)
    return (w - (w >= 2 ** 31).long() * 2 ** 32).to(torch.int32)  # as a two's complement int32


def dequantize(q, zeros, scales, g_idx) -> torch.Tensor:
    """Plain integers -> float32 W (out, in) = (q - zeros[g_idx].T) * scales[g_idx].T."""
    return (q.float() - zeros[g_idx].T.float()) * scales[g_idx].T.float()


@dataclass
class PackedLinear:
    """One quantized linear as stored in the checkpoint (see the module docstring)."""
    name: str
    cfg: QuantConfig
    out_features: int
    in_features: int
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.in_features if self.cfg.group_size == -1 else self.cfg.group_size

    @property
    def groups(self) -> int:
        return -(-self.in_features // self.group_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q uint8 (out, in) in 0..15, zeros int32 (groups, out), scales (groups, out) as stored,
        g_idx int64 (in,): the plain integers of W[o, i] = (q[o, i] - zeros[g, o]) * scales[g, o]."""
        O, I, G = self.out_features, self.in_features, self.groups
        if self.cfg.method == "awq":
            inverse = torch.tensor(AWQ_ORDER).argsort()  # nibble that holds each channel
            q = nibbles(self.qweight)[..., inverse].reshape(I, O).T  # (in, out/8, 8) -> (out, in)
            zeros = nibbles(self.qzeros)[..., inverse].reshape(G, O)  # (groups, out/8, 8) -> (groups, out)
            g_idx = torch.arange(I) // self.group_size
        else:
            q = nibbles(self.qweight).permute(0, 2, 1).reshape(I, O).T  # (in/8, out, 8) -> (out, in)
            zeros = nibbles(self.qzeros).reshape(G, -1)[:, :O]  # (groups, ceil(out/8), 8) -> (groups, out)
            g_idx = torch.arange(I) // self.group_size if self.g_idx is None else self.g_idx.long()
        return q.contiguous(), zeros.to(torch.int32) + self.cfg.zero_offset, self.scales, g_idx

    def dequantize(self) -> torch.Tensor:
        return dequantize(*self.unpack())


def read_packed(tensors: dict, name: str, qcfg: QuantConfig, out: int, inn: int, where) -> PackedLinear:
    """Take `name`'s qweight / qzeros / scales (/ g_idx) out of `tensors`, checking them against
    the config's (out, in) shape and the group size."""
    need = ("qweight", "qzeros", "scales")
    missing = [f"{name}.{t}" for t in need if f"{name}.{t}" not in tensors]
    if missing:
        raise ValueError(f"{where}: missing {missing} ({qcfg.method.upper()} stores qweight, qzeros and "
                         f"scales for every quantized linear)")
    p = PackedLinear(name, qcfg, out, inn, *(tensors.pop(f"{name}.{t}") for t in need),
                     g_idx=tensors.pop(f"{name}.g_idx", None))
    gs, G = p.group_size, p.groups
    if qcfg.method == "awq":
        if inn % gs or out % 8:
            raise ValueError(f"{where}: {name} is {out}x{inn}; AWQ with group size {gs} needs in_features a "
                             f"multiple of it and out_features a multiple of 8")
        want = {"qweight": (inn, out // 8), "qzeros": (inn // gs, out // 8), "scales": (inn // gs, out)}
    else:
        if inn % 8:
            raise ValueError(f"{where}: {name} is {out}x{inn}; GPTQ needs in_features a multiple of 8")
        want = {"qweight": (inn // 8, out), "qzeros": (G, -(-out // 8)), "scales": (G, out), "g_idx": (inn,)}
        if p.g_idx is None and qcfg.desc_act:
            raise ValueError(f"{where}: missing {name}.g_idx, which desc_act (act order) needs")
    for t, shape in want.items():
        v = getattr(p, t)
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"{where}: {name}.{t} has shape {tuple(v.shape)}; {qcfg.method.upper()} with group "
                             f"size {qcfg.group_size} expects {shape} for this {out}x{inn} linear")
    for t in ("qweight", "qzeros") + (("g_idx",) if p.g_idx is not None else ()):
        if getattr(p, t).dtype != torch.int32:
            raise ValueError(f"{where}: {name}.{t} is {getattr(p, t).dtype}; the format stores int32")
    if p.g_idx is not None and (p.g_idx.min() < 0 or p.g_idx.max() >= G):
        raise ValueError(f"{where}: {name}.g_idx names groups outside 0..{G - 1}")
    return p


def split_checkpoint(tensors: dict, qcfg: QuantConfig, cfg, where, dequantize: bool = False):
    """Separate a quantized checkpoint's tensors (modified in place) -> (float weights by released
    name, {(layer, fused linear name): [PackedLinear of each part, in fused order]}).

    Fused decoder linears whose parts are all quantized run on int4 kernels (their biases travel
    with them); every other quantized linear (outside the decoder layers, in a partly quantized
    fused linear, or all of them with `dequantize`) comes back as a dequantized float `.weight`."""
    from .text import fused_linears

    shapes = expected_weights(cfg)
    names = sorted(k[:-len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not names:
        raise ValueError(f"{where}: config.json declares {qcfg.method} quantization but no *.qweight tensor is stored")
    packed = {}
    for m in names:
        if len(shapes.get(m + ".weight", ())) != 2:
            raise ValueError(f"{where}: {m}.qweight belongs to no linear layer of this config")
        packed[m] = read_packed(tensors, m, qcfg, *shapes[m + ".weight"], where)
    stray = sorted(k for k in tensors if k.endswith((".qzeros", ".scales", ".g_idx")))
    if stray:
        raise ValueError(f"{where}: {stray[:4]} stored without a qweight")
    int4 = {}
    for i in range(cfg.layers if not dequantize else 0):
        for fused, parts in fused_linears(cfg).items():
            mods = [f"model.layers.{i}.{p}" for p, _ in parts]
            if all(m in packed for m in mods):
                int4[(i, fused)] = [packed.pop(m) for m in mods]
                for p in int4[(i, fused)]:
                    if p.name + ".bias" in shapes:
                        if p.name + ".bias" not in tensors:
                            raise ValueError(f"{where}: missing weights: ['{p.name}.bias']")
                        p.bias = tensors.pop(p.name + ".bias")
    for m, p in packed.items():
        tensors[m + ".weight"] = p.dequantize()
    return tensors, int4


def int4_tensor_names(int4: dict) -> list[str]:
    """Released float names (weights, biases) that `split_checkpoint` moved into 4-bit linears."""
    return [p.name + s for parts in int4.values() for p in parts for s in (".weight", ".bias")]


# ----------------------------------------------------------------------------- kernels
def check_int4_kernel(device: torch.device) -> None:
    """Raise a RuntimeError saying why torch's int4 kernels cannot run on `device`, if they cannot."""
    hint = "; load with dequantize=True for float weights"
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < "2.6":
        raise RuntimeError(f"torch {torch.__version__} lacks the int4 kernels this loader uses (torch >= 2.6){hint}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if torch.version.hip is None and major < 8:
            raise RuntimeError(f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no int4 kernel: "
                               f"torch's needs sm_80 or later{hint}")
    elif device.type != "cpu":
        raise RuntimeError(f"int4 kernels are wired for cuda and cpu, not {device.type}{hint}")
    _probe(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _probe(kind: str, index) -> None:
    """Run the kernel once on a small matrix: a build without it fails here, at load time."""
    dev = torch.device(kind, index) if index is not None else torch.device(kind)
    q = torch.zeros(16, 32, dtype=torch.uint8)
    try:
        w = Int4Weight.pack(q, torch.zeros(1, 16, dtype=torch.int32), torch.ones(1, 16),
                            torch.zeros(32, dtype=torch.long), 32, dev)
        w(torch.ones(1, 32, device=dev))
    except RuntimeError as e:
        raise RuntimeError(f"torch's int4 kernel does not run on {dev}: {e}; load with dequantize=True "
                           f"for float weights") from None


class Int4Weight(nn.Module):
    """A weight matrix W (out, in) packed for torch's int4 kernels; calling it computes x @ W.T + bias.

    Buffers: `packed` (the kernel's layout, device specific), `scale_zero` (in/group, out, 2) in the
    kernel's compute dtype, `perm` (in,) the input order that makes act-order groups contiguous."""

    def __init__(self, packed, scale_zero, perm, group: int, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.register_buffer("perm", perm)
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.k_pad = scale_zero.shape[0] * group - in_features  # zero columns appended to x
        self.packed_for = packed.device.type

    @classmethod
    def pack(cls, q, zeros, scales, g_idx, group_size: int, device,
             compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Weight":
        """Repack plain integers (see PackedLinear.unpack) for `device`. `compute_dtype`: what the
        kernel computes in (bfloat16: see the module docstring; the CPU also takes float32, exact
        to float32 rounding but slow, and float16)."""
        N, K = q.shape
        device = torch.device(device)
        if device.type == "cuda" and compute_dtype != torch.bfloat16:
            raise ValueError(f"torch's CUDA int4 kernel computes in bfloat16 only, not {compute_dtype}")
        contiguous = torch.arange(K) // group_size
        perm = None
        if not torch.equal(g_idx, contiguous):  # act order: sort rows by group, once
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], contiguous):
                raise ValueError(f"g_idx does not form groups of {group_size} input rows; load with dequantize=True")
            q = q[:, perm]
        kg = next((g for g in KERNEL_GROUPS if group_size % g == 0), None)
        if kg is None:
            raise ValueError(f"group size {group_size} is not a multiple of 32, which torch's int4 kernels need; "
                             f"load with dequantize=True")
        Kp, Np = -(-K // kg) * kg, -(-N // 16) * 16  # kernels need whole groups and 16-row tiles
        group_of_block = torch.arange(0, Kp, kg) // group_size  # (Kp/kg,) checkpoint group of each kernel group
        s = scales.float()[group_of_block]  # (Kp/kg, N)
        z = zeros.float()[group_of_block]
        scale_zero = F.pad(torch.stack([s, (8 - z) * s], -1), (0, 0, 0, Np - N))  # (Kp/kg, Np, 2); pad rows: 0
        qp = torch.full((Np, Kp), 8, dtype=torch.uint8)
        qp[:N, :K] = q
        if device.type == "cuda":
            byte = (qp[:, ::2] << 4) | qp[:, 1::2]  # (Np, Kp/2): even input rows in the high nibble
            inner = 8 if Kp % 128 == 0 else 4 if Kp % 64 == 0 else 2
            packed = torch.ops.aten._convert_weight_to_int4pack(byte.to(device).contiguous(), inner)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qp.to(torch.int32).to(device), 2)
        return cls(packed, scale_zero.to(device, compute_dtype).contiguous(),
                   None if perm is None else perm.to(device), kg, K, N)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        if x.device.type != self.packed_for:
            raise RuntimeError(f"4-bit weights were packed for {self.packed_for}; load the model on {x.device.type}")
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.k_pad:
            x2 = F.pad(x2, (0, self.k_pad))  # (M, Kp)
        x2 = x2.to(self.scale_zero.dtype).contiguous()
        if self.packed_for == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group, self.scale_zero)  # (M, Np)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)
        y = y[:, :self.out_features].to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group}, act_order={self.perm is not None}"


class Int4Linear(nn.Module):
    """A fused decoder linear with a 4-bit weight, named like nn.Linear (weight, bias) for kernels.linear."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


def fuse_parts(parts: list[PackedLinear], rows: list) -> tuple:
    """Plain integers of a fused linear: the parts' output channels stacked (q/k in rotary order).
    Groups run along the input, so taking output rows keeps them intact."""
    from .text import take_rows

    plain = [p.unpack() for p in parts]
    for p, u in zip(parts[1:], plain[1:]):
        if p.group_size != parts[0].group_size or not torch.equal(u[3], plain[0][3]):
            raise ValueError(f"{parts[0].name} and {p.name} group their input rows differently but run as one "
                             f"fused linear here; load with dequantize=True")
    q = torch.cat([take_rows(u[0], r) for u, r in zip(plain, rows)])  # (out, in)
    zeros = torch.cat([u[1] if r is None else u[1][:, r] for u, r in zip(plain, rows)], 1)  # (groups, out)
    scales = torch.cat([u[2] if r is None else u[2][:, r] for u, r in zip(plain, rows)], 1)
    return q, zeros, scales, plain[0][3], parts[0].group_size


def attach_int4_linears(decoder: nn.Module, int4: dict, device, dtype,
                        compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Put Int4Linear modules on `device` in place of the decoder's fused linears listed in `int4`
    (see split_checkpoint), repacked for torch's int4 kernels one layer at a time; biases in the
    model `dtype`, matmuls in `compute_dtype` (see Int4Weight.pack)."""
    if not int4:
        return
    from .text import fused_linears, take_rows

    device = torch.device(device)
    check_int4_kernel(device)
    layout = fused_linears(decoder.cfg)
    for (i, name), parts in int4.items():
        rows = [r for _, r in layout[name]]
        weight = Int4Weight.pack(*fuse_parts(parts, rows), device=device, compute_dtype=compute_dtype)
        bias = None
        if parts[0].bias is not None:
            bias = torch.cat([take_rows(p.bias, r) for p, r in zip(parts, rows)]).to(device, dtype)
        setattr(decoder.layers[i], name, Int4Linear(weight, bias))


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (4-bit weights count at their packed size)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# ----------------------------------------------------------------------------- writing (test checkpoints)
def quantize_rtn(w: torch.Tensor, method: str, group_size: int, sym: bool = True, order=None, min_zero: int = 0):
    """Round-to-nearest 4-bit quantization of W (out, in) as AWQ / GPTQ compute their grids
    -> (q uint8 (out, in), zeros int32 (groups, out), scales float16 (groups, out), g_idx (in,)).

    AWQ: scale = (max - min) / 15, zero = -round(min / scale) per group. GPTQ takes min <= 0 <= max;
    symmetric: scale = 2 max|w| / 15, zero = 8; else scale = (max - min) / 15, zero =
    round(-min / scale), at least `min_zero` (GPTQ v1 stores zero - 1 as a nibble, so 1).
    `order` (GPTQ act order) is the input-row order in which groups are formed."""
    O, I = w.shape
    gs = I if group_size == -1 else group_size
    order = torch.arange(I) if order is None else order
    g_idx = torch.empty(I, dtype=torch.long)
    g_idx[order] = torch.arange(I) // gs
    G = -(-I // gs)
    q = torch.empty(O, I, dtype=torch.uint8)
    zeros = torch.empty(G, O, dtype=torch.int32)
    scales = torch.empty(G, O, dtype=torch.float16)
    for g in range(G):
        cols = order[g * gs:(g + 1) * gs]
        wg = w[:, cols].float()  # (out, n)
        hi, lo = wg.amax(1), wg.amin(1)
        if method == "awq":
            s = ((hi - lo).clamp(min=1e-5) / 15).half()
            z = (-torch.round(lo / s.float())).clamp(0, 15)
        elif sym:
            s = (torch.maximum(hi.clamp(min=0), -lo.clamp(max=0)) * 2 / 15).clamp(min=1e-5).half()
            z = torch.full_like(hi, 8)
        else:
            s = ((hi.clamp(min=0) - lo.clamp(max=0)) / 15).clamp(min=1e-5).half()
            z = torch.round(-lo.clamp(max=0) / s.float()).clamp(min_zero, 15)
        q[:, cols] = (torch.round(wg / s.float()[:, None]) + z[:, None]).clamp(0, 15).to(torch.uint8)
        zeros[g], scales[g] = z.to(torch.int32), s
    return q, zeros, scales, g_idx


def quantize_awq_rtn(w: torch.Tensor, group_size: int = 128):
    """`quantize_rtn(w, "awq", group_size)` vectorized on w's device (seconds for a 3B decoder on a
    GPU instead of minutes on a CPU): the same grid, rounding and outputs, q/zeros/scales on w's device."""
    O, I = w.shape
    G = -(-I // group_size)
    wf = w.float()
    if G * group_size != I:  # a partial last group: repeat its last column (min and max unchanged)
        wf = torch.cat([wf, wf[:, -1:].expand(O, G * group_size - I)], 1)
    wg = wf.view(O, G, group_size)
    hi, lo = wg.amax(2), wg.amin(2)  # (O, G)
    s = ((hi - lo).clamp(min=1e-5) / 15).half()
    z = (-torch.round(lo / s.float())).clamp(0, 15)
    q = (torch.round(wg / s.float()[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8).view(O, -1)[:, :I]
    return q, z.T.to(torch.int32).contiguous(), s.T.contiguous(), torch.arange(I) // group_size


def quantize_decoder_int4(decoder: nn.Module, group_size: int = 128, compute_dtype: torch.dtype = torch.bfloat16):
    """Replace a loaded float decoder's fused linears by 4-bit ones on AWQ's round-to-nearest grid
    at `group_size` (what an AWQ checkpoint of these weights loads to, without writing one):
    the int4 rows of bench/gpu.py. Biases stay in the model dtype."""
    from .text import fused_linears

    dev = decoder.embed.weight.device
    check_int4_kernel(dev)
    for layer in decoder.layers:
        for name in fused_linears(decoder.cfg):
            lin = getattr(layer, name)
            q, zeros, scales, g_idx = quantize_awq_rtn(lin.weight.detach(), group_size)
            weight = Int4Weight.pack(q.cpu(), zeros.cpu(), scales.cpu(), g_idx, group_size, dev, compute_dtype)
            setattr(layer, name, Int4Linear(weight, None if lin.bias is None else lin.bias.detach()))


def pack_linear(method: str, q, zeros, scales, g_idx, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """Plain integers -> the stored tensors {qweight, qzeros, scales(, g_idx)} of `method`'s format
    (GPTQ: zero points stored minus `zero_offset`, 1 for the released v1 format)."""
    O, I = q.shape
    if method == "awq":
        qweight = words(q.T.reshape(I, O // 8, 8)[..., list(AWQ_ORDER)])  # (in, out/8)
        qzeros = words(zeros.reshape(-1, O // 8, 8)[..., list(AWQ_ORDER)])  # (groups, out/8)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    qweight = words(q.T.reshape(I // 8, 8, O).permute(0, 2, 1))  # (in/8, out)
    z = ((zeros - zero_offset) & 0xF).to(torch.uint8)
    z = F.pad(z, (0, -O % 8))  # (groups, out rounded up to 8)
    qzeros = words(z.reshape(z.shape[0], -1, 8))  # (groups, ceil(out/8))
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}


def storable_group_size(method: str, in_features: list[int], group_size: int | None) -> int:
    """The group size to store: `group_size` when the loader will take it for these decoder input
    widths (a multiple of 32, as torch's int4 kernels need, or -1 for GPTQ; AWQ also needs every
    width a multiple of it), else a ValueError saying why; None picks the largest of 128, 64, 32
    that every width is a multiple of."""
    if group_size is None:
        fits = [g for g in (128, 64, 32) if all(k % g == 0 for k in in_features)]
        if not fits:
            raise ValueError(f"no group size of 128, 64 or 32 divides the decoder's input widths {sorted(set(in_features))}")
        return fits[0]
    if method == "gptq" and group_size == -1:
        return group_size
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"group size {group_size} is not a multiple of 32, which torch's int4 kernels need"
                         + (" (or -1 for GPTQ)" if method == "gptq" else ""))
    bad = sorted({k for k in in_features if k % group_size})
    if method == "awq" and bad:
        raise ValueError(f"AWQ with group size {group_size} needs every decoder input width a multiple of it; "
                         f"{bad} are not (leave group_size unset to pick one that fits)")
    return group_size


def quantize_weights(weights: dict, cfg, method: str, group_size: int | None = None, sym: bool = True,
                     desc_act: bool = False, seed: int = 0) -> tuple[dict, dict, dict]:
    """4-bit round-to-nearest quantization of a float checkpoint's decoder linears
    -> (tensors in `method`'s stored format, float twin holding exactly the dequantized weights,
    the config.json quantization_config). GPTQ act order uses one seeded random input order per
    input (q/k/v share theirs, as do gate/up: GPTQ derives it from the inputs). `group_size`:
    see :func:`storable_group_size` (refused here, at save time, when loading would refuse it)."""
    from .text import fused_linears

    if method not in ("awq", "gptq"):
        raise ValueError(f"quantize must be 'awq' or 'gptq', got {method!r}")
    widths = [weights[f"model.layers.0.{parts[0][0]}.weight"].shape[1] for parts in fused_linears(cfg).values()]
    group_size = storable_group_size(method, widths, group_size)
    gen = torch.Generator().manual_seed(seed + 1)
    stored, twin = dict(weights), dict(weights)
    for i in range(cfg.layers):
        for parts in fused_linears(cfg).values():
            inn = weights[f"model.layers.{i}.{parts[0][0]}.weight"].shape[1]
            order = torch.randperm(inn, generator=gen) if method == "gptq" and desc_act else None
            for p, _ in parts:
                m = f"model.layers.{i}.{p}"
                plain = quantize_rtn(stored.pop(m + ".weight"), method, group_size, sym, order,
                                     min_zero=1 if method == "gptq" else 0)
                twin[m + ".weight"] = dequantize(*plain)
                stored.update({f"{m}.{k}": v for k, v in pack_linear(method, *plain).items()})
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": ["visual"]}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym,
              "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq"}
    return stored, twin, qc
