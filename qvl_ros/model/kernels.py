"""Linear layers dispatched per device.

On the CPU, oneDNN's linear (the kernel torch.compile's freezing pass picks) runs these
tall-skinny float32 matmuls 1.6-2x faster than the default `addmm` here, and fuses the bias and
a residual add into the matmul's output pass. Elsewhere (CUDA, other dtypes) this is F.linear.
A weight may also be a packed 4-bit matrix (quant.Int4Weight), which runs torch's int4 kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())  # inside torch.compile, F.linear lets inductor choose


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias."""
    if not isinstance(weight, torch.Tensor):  # a 4-bit weight (quant.Int4Weight)
        return weight(x, bias)
    if _use_onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_add(x: torch.Tensor, weight, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight.T + bias, with the add in the matmul's output pass where possible.

    A float32 residual with lower-precision x and weight (the mixed-precision residual stream)
    gets the matmul's result added in float32."""
    if not isinstance(weight, torch.Tensor):  # a 4-bit weight (quant.Int4Weight)
        out = weight(x, bias)
        return out.add_(residual) if out.dtype == residual.dtype else residual + out
    if residual.dtype != x.dtype:
        return residual + F.linear(x, weight, bias)
    if _use_onednn(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out.add_(bias)
    return out.view(residual.shape)


def tune_cpu_allocator() -> bool:
    """glibc malloc settings for large tensors that come and go every batch: one arena for all
    threads and no mmap/trim below 256/512 MiB, so a worker thread reuses freed blocks instead of
    mapping (and page-faulting) fresh memory each time. Measured on 2 CPU cores: encode +21%,
    node sets/s at saturation +19% (bench/studies/README.md). Process-wide: entry points call it
    before torch allocates; libraries embedding qvl_ros may choose to. False where not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return bool(libc.mallopt(m_mmap_threshold, 256 << 20) and libc.mallopt(m_trim_threshold, 512 << 20)
                and libc.mallopt(m_arena_max, 1))
