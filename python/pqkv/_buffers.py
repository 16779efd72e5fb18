"""Turning numpy arrays, torch tensors and other array producers into pointers.

Host arrays come from numpy (or anything numpy can view without a copy);
device arrays from torch, any `__cuda_array_interface__` producer (CuPy,
Numba) or any DLPack producer (through torch.from_dlpack). pqkv reads and
writes them in place: every buffer must be dense and row-major (C-contiguous).
torch is imported only if the caller already did, so numpy users never pay for it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .errors import InvalidArgumentError
from .types import DType

_NUMPY_DTYPES = {np.dtype(np.float32): DType.F32, np.dtype(np.float16): DType.F16}
_TYPESTR = {"<f4": DType.F32, "<f2": DType.F16}


def _torch() -> Any:
    return sys.modules.get("torch")


def _torch_dtype(t: Any) -> Optional[DType]:
    torch = _torch()
    return {torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16}.get(t)


@dataclass
class Buffer:
    """A dense buffer pqkv can read or write.

    ptr: address; dtype: element type; shape: dims; device: "cpu" or "cuda";
    device_index: CUDA ordinal (-1 for host, None when the producer does not
    say); stream: the producer's current CUDA stream handle (torch) or None;
    owner: the object that keeps the memory alive.
    """

    ptr: int
    dtype: DType
    shape: Tuple[int, ...]
    device: str
    device_index: Optional[int]
    stream: Optional[int]
    owner: Any

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


def is_torch_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _from_torch(x: Any, name: str, writable: bool) -> Buffer:
    torch = _torch()
    dtype = _torch_dtype(x.dtype)
    if dtype is None:
        raise InvalidArgumentError(
            f"{name}: pqkv takes bfloat16, float16 or float32 tensors, got {x.dtype}"
        )
    if not x.is_contiguous():
        raise InvalidArgumentError(
            f"{name}: the tensor must be contiguous (row-major); call .contiguous() first"
        )
    if writable and x.requires_grad:
        raise InvalidArgumentError(f"{name}: an output tensor must not require grad")
    if x.device.type == "cuda":
        stream = torch.cuda.current_stream(x.device).cuda_stream
        return Buffer(x.data_ptr(), dtype, tuple(x.shape), "cuda", x.device.index, stream, x)
    if x.device.type != "cpu":
        raise InvalidArgumentError(f"{name}: tensors on {x.device} are not supported (cpu or cuda)")
    return Buffer(x.data_ptr(), dtype, tuple(x.shape), "cpu", -1, None, x)


def _from_cuda_array_interface(x: Any, name: str, writable: bool) -> Buffer:
    cai = x.__cuda_array_interface__
    shape = tuple(int(s) for s in cai["shape"])
    dtype = _TYPESTR.get(cai["typestr"])
    if dtype is None:
        raise InvalidArgumentError(
            f"{name}: typestr {cai['typestr']!r} is not float16 or float32 "
            "(bfloat16 device arrays: pass a torch tensor)"
        )
    strides = cai.get("strides")
    if strides is not None:
        expected, step = [], 2 if dtype == DType.F16 else 4
        for s in reversed(shape):
            expected.append(step)
            step *= s
        if tuple(strides) != tuple(reversed(expected)):
            raise InvalidArgumentError(f"{name}: the device array must be C-contiguous")
    ptr, readonly = cai["data"]
    if writable and readonly:
        raise InvalidArgumentError(f"{name}: the device array is read-only")
    stream = cai.get("stream")
    return Buffer(int(ptr or 0), dtype, shape, "cuda", None, stream, x)


def _from_numpy(x: np.ndarray, name: str, writable: bool) -> Buffer:
    dtype = _NUMPY_DTYPES.get(x.dtype)
    if dtype is None and x.dtype.name == "bfloat16":  # ml_dtypes' bfloat16
        dtype = DType.BF16
    if dtype is None:
        raise InvalidArgumentError(
            f"{name}: pqkv takes float16 or float32 arrays (bfloat16 through torch or "
            f"ml_dtypes), got {x.dtype}; convert with .astype(np.float32)"
        )
    if not x.flags.c_contiguous:
        raise InvalidArgumentError(
            f"{name}: the array must be C-contiguous; use np.ascontiguousarray"
        )
    if writable and not x.flags.writeable:
        raise InvalidArgumentError(f"{name}: the output array is read-only")
    return Buffer(x.ctypes.data, dtype, tuple(x.shape), "cpu", -1, None, x)


def as_buffer(x: Any, name: str, writable: bool = False) -> Buffer:
    """A Buffer over `x` without copying it.

    Accepts numpy arrays, torch tensors (cpu or cuda), objects with
    `__cuda_array_interface__`, and DLPack producers. Raises
    InvalidArgumentError for anything pqkv cannot use in place.
    """
    if isinstance(x, np.ndarray):
        return _from_numpy(x, name, writable)
    if is_torch_tensor(x):
        return _from_torch(x, name, writable)
    if hasattr(x, "__cuda_array_interface__"):
        return _from_cuda_array_interface(x, name, writable)
    if hasattr(x, "__dlpack__"):
        torch = _torch()
        if torch is not None and hasattr(torch, "from_dlpack"):
            return _from_torch(torch.from_dlpack(x), name, writable)
        return _from_numpy(np.from_dlpack(x), name, writable)
    if writable:
        raise InvalidArgumentError(
            f"{name}: an output must be a numpy array or a tensor, got {type(x).__name__}"
        )
    arr = np.asarray(x)
    if arr.dtype == np.float64:
        raise InvalidArgumentError(
            f"{name}: float64 input; pqkv takes float32, float16 or bfloat16 (np.asarray(x, np.float32))"
        )
    return _from_numpy(np.ascontiguousarray(arr), name, writable)


def check_shape(buf: Buffer, name: str, expected: Sequence[Optional[int]], what: str) -> None:
    """Raises InvalidArgumentError unless buf.shape matches (None matches any size)."""
    ok = len(buf.shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, buf.shape)
    )
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise InvalidArgumentError(f"{name}: expected shape {want} ({what}), got {list(buf.shape)}")


def empty_like(buf: Buffer, shape: Tuple[int, ...], int32: bool = False) -> Any:
    """A new array of `shape` where `buf` lives: numpy on the host, torch on a GPU.

    The element type is buf's, or int32 when `int32` is set.
    """
    if buf.on_gpu:
        torch = _torch()
        if torch is None or not is_torch_tensor(buf.owner):
            raise InvalidArgumentError(
                "pqkv allocates device outputs with torch only; pass the output arrays yourself"
            )
        dtype = torch.int32 if int32 else buf.owner.dtype
        return torch.empty(shape, dtype=dtype, device=buf.owner.device)
    if is_torch_tensor(buf.owner):
        torch = _torch()
        return torch.empty(shape, dtype=torch.int32 if int32 else buf.owner.dtype)
    if int32:
        return np.empty(shape, dtype=np.int32)
    return np.empty(shape, dtype=buf.owner.dtype)


def stream_handle(stream: Any) -> Optional[int]:
    """A cudaStream_t as an int from an int, a torch.cuda.Stream, a CuPy stream or None."""
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        h = getattr(stream, attr, None)
        if isinstance(h, int):
            return h
    raise InvalidArgumentError(
        f"stream: expected a cudaStream_t handle (int), torch.cuda.Stream or CuPy stream, "
        f"got {type(stream).__name__}"
    )
