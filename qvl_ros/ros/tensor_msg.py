"""Conversion between tensors and `qvl_ros/FeatureTensor` messages.

A FeatureTensor carries one dense tensor as raw bytes: `dtype` ("float32", "float16" or
"bfloat16"), `shape` (outermost dimension first) and `data`, the elements in C (row-major)
order, each little-endian. These helpers build and read such messages:

    msg = from_tensor("vision/front", feats)       # torch.Tensor or numpy array
    arr = to_numpy(msg)                             # numpy array, bfloat16 as float32 values
    ten = to_torch(msg, device="cuda")              # torch tensor, exact dtype incl. bfloat16
    arrays = features_to_numpy(vision_features)     # {name: array} for a VisionFeatures message

Both directions avoid per-element Python work: the sender copies the tensor's bytes once into
the message's `array.array('B')` (rclpy copies that buffer once more when publishing), and the
receiver gets a numpy/torch view of the received buffer without copying (pass `copy=True` for
memory of its own).

Only the message classes come from ROS (imported when a message is built); torch is imported
only when a torch tensor is passed or requested, so the readers work with numpy alone.
"""
from __future__ import annotations

import array
import math
import sys
from typing import Any

import numpy as np

__all__ = ["DTYPES", "storage_array", "from_tensor", "to_numpy", "to_torch", "features_to_numpy"]

# dtype name -> (little-endian storage dtype of one element, numpy dtype to_numpy returns)
_STORAGE = {
    "float32": (np.dtype("<f4"), np.dtype(np.float32)),
    "float16": (np.dtype("<f2"), np.dtype(np.float16)),
    "bfloat16": (np.dtype("<u2"), np.dtype(np.float32)),
}
DTYPES = tuple(_STORAGE)
_LITTLE = sys.byteorder == "little"


def _new_feature_tensor():
    from qvl_ros.msg import FeatureTensor

    # With field checks on, assigning an array.array of the right type code stores it as is
    # (otherwise the setter copies it once more). Older generated code has no check_fields
    # keyword and always stores arrays as is.
    try:
        return FeatureTensor(check_fields=True)
    except (AssertionError, TypeError):
        return FeatureTensor()


def _is_torch(tensor: Any) -> bool:
    return type(tensor).__module__.startswith("torch") and hasattr(tensor, "detach")


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in _STORAGE:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}")


def _unsupported(dtype: Any) -> TypeError:
    return TypeError(f"unsupported dtype {dtype}; expected one of {DTYPES} (or pass dtype= to convert)")


def storage_array(tensor: Any, dtype: str | None) -> tuple[np.ndarray, str]:
    """C-contiguous little-endian numpy array holding the bytes to send, and the dtype name.

    bfloat16 is carried as its raw 16-bit patterns (uint16), since numpy has no bfloat16.
    """
    _check_dtype(dtype)
    if _is_torch(tensor):
        import torch

        t = tensor.detach()
        if dtype is not None:
            t = t.to(getattr(torch, dtype))
        name = str(t.dtype).removeprefix("torch.")
        if name not in _STORAGE:
            raise _unsupported(t.dtype)
        t = t.to("cpu").contiguous()
        if name == "bfloat16":
            arr = t.view(torch.int16).numpy().view(np.uint16)
        else:
            arr = t.numpy()
    else:
        arr = np.asarray(tensor)
        name = arr.dtype.name
        if name == "bfloat16":  # e.g. ml_dtypes.bfloat16
            if dtype not in (None, "bfloat16"):
                arr = arr.astype(np.float32)
                name = "float32"
            else:
                arr = arr.view(np.uint16)
        if dtype is not None and name != dtype:
            if arr.dtype.kind not in "fiub":
                raise _unsupported(arr.dtype)
            with np.errstate(over="ignore"):  # out-of-range values become inf, as in torch
                if dtype == "bfloat16":
                    arr = _float32_to_bfloat16_bits(arr.astype(np.float32))
                else:
                    arr = arr.astype(_STORAGE[dtype][1])
            name = dtype
        if name not in _STORAGE:
            raise _unsupported(arr.dtype)
    # One step to little-endian C order; no copy when the array already is.
    return np.asarray(arr, dtype=_STORAGE[name][0], order="C"), name


def _float32_to_bfloat16_bits(arr: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16), NaN kept as NaN."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(arr)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def from_tensor(name: str, tensor: Any, dtype: str | None = None):
    """Build a `qvl_ros.msg.FeatureTensor` from a torch tensor or a numpy array.

    Args:
        name: the message's `name`, e.g. "vision/front" or "hidden".
        tensor: float32, float16 or bfloat16 torch tensor (any device, any strides) or numpy
            array (float32/float16, any byte order; bfloat16 arrays from `ml_dtypes` too).
        dtype: convert to this dtype first ("float32" | "float16" | "bfloat16"); default keeps
            the tensor's own dtype and rejects other dtypes.

    The bytes are C-contiguous and little-endian. A GPU tensor is copied to the host here (one
    synchronizing copy); the bytes are then copied once into the message.
    """
    arr, dtype_name = storage_array(tensor, dtype)
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"dimension too large for uint32 shape: {arr.shape}")
    msg = _new_feature_tensor()
    msg.name = str(name)
    msg.dtype = dtype_name
    msg.shape = array.array("I", arr.shape)
    data = array.array("B")
    if arr.size:
        data.frombytes(arr.reshape(-1).view(np.uint8))
    msg.data = data
    return msg


def _checked_view(msg) -> tuple[np.ndarray, tuple[int, ...]]:
    """Zero-copy view of msg.data as the little-endian storage dtype, and the shape."""
    if msg.dtype not in _STORAGE:
        raise ValueError(f"FeatureTensor {msg.name!r}: unsupported dtype {msg.dtype!r}")
    storage = _STORAGE[msg.dtype][0]
    shape = tuple(int(d) for d in msg.shape)
    count = math.prod(shape)
    nbytes = len(msg.data)
    if nbytes != count * storage.itemsize:
        raise ValueError(
            f"FeatureTensor {msg.name!r}: {nbytes} data bytes do not match shape {shape} "
            f"of {msg.dtype} ({count * storage.itemsize} bytes expected)")
    if count == 0:
        return np.empty(shape, dtype=storage), shape
    return np.frombuffer(msg.data, dtype=storage, count=count).reshape(shape), shape


def to_numpy(msg, copy: bool = False) -> np.ndarray:
    """Rebuild the numpy array held by a FeatureTensor (native byte order, C order).

    float32 and float16 come back with their own dtype, as a view of the message's buffer (no
    copy; while it lives, `msg.data` cannot be resized) unless `copy=True`. numpy has no bfloat16, so bfloat16 comes back as float32 *values*
    (exact: every bfloat16 is a float32), always in new memory; use `to_torch` to get a real
    bfloat16 tensor.

    Raises ValueError for an unknown dtype or when the byte count does not match the shape.
    """
    view, _ = _checked_view(msg)
    out_dtype = _STORAGE[msg.dtype][1]
    if msg.dtype == "bfloat16":
        return (view.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if not _LITTLE:
        return view.astype(out_dtype)
    return view.copy() if copy else view


def to_torch(msg, device: Any = None, copy: bool = False):
    """Rebuild a torch tensor from a FeatureTensor, with its exact dtype (bfloat16 included).

    On the CPU the result shares memory with the message unless `copy=True`; with a `device`
    it is copied there (non-blocking from the host buffer where the device allows).
    """
    import torch

    view, shape = _checked_view(msg)
    if not _LITTLE:
        view = view.astype(view.dtype.newbyteorder("="))
    if msg.dtype == "bfloat16":
        tensor = torch.from_numpy(view.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(view)
    tensor = tensor.reshape(shape)
    if device is not None and torch.device(device).type != "cpu":
        return tensor.to(device, non_blocking=True)
    if copy:
        tensor = tensor.clone()
    return tensor


def features_to_numpy(msg, copy: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a VisionFeatures message as {name: numpy array} (see `to_numpy`)."""
    return {t.name: to_numpy(t, copy=copy) for t in msg.tensors}
