"""How arrays from numpy, torch, DLPack and __cuda_array_interface__ producers become pointers."""

import numpy as np
import pytest

import pqkv
from pqkv._buffers import as_buffer, stream_handle


class FakeDeviceArray:
    """A __cuda_array_interface__ producer (no memory behind it: only parsed)."""

    def __init__(self, shape, typestr="<f2", strides=None, readonly=False, stream=None):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (0xDEAD0000, readonly),
            "strides": strides, "version": 3, "stream": stream,
        }


def test_numpy_array_is_used_in_place():
    a = np.zeros((3, 2, 8), np.float32)
    b = as_buffer(a, "keys")
    assert b.ptr == a.ctypes.data and b.dtype == pqkv.DType.F32 and b.device == "cpu"
    assert as_buffer(np.zeros((2, 4), np.float16), "q").dtype == pqkv.DType.F16
    with pytest.raises(pqkv.InvalidArgumentError, match="read-only"):
        ro = np.zeros(4, np.float32)
        ro.flags.writeable = False
        as_buffer(ro, "out", writable=True)


def test_cuda_array_interface():
    b = as_buffer(FakeDeviceArray((4, 8), stream=7), "q")
    assert (b.ptr, b.shape, b.dtype, b.device, b.stream) == (0xDEAD0000, (4, 8), pqkv.DType.F16, "cuda", 7)
    as_buffer(FakeDeviceArray((4, 8), "<f4", strides=(32, 4)), "q")  # explicit C strides
    with pytest.raises(pqkv.InvalidArgumentError, match="C-contiguous"):
        as_buffer(FakeDeviceArray((4, 8), "<f4", strides=(4, 16)), "q")
    with pytest.raises(pqkv.InvalidArgumentError, match="typestr"):
        as_buffer(FakeDeviceArray((4, 8), "<i4"), "q")
    with pytest.raises(pqkv.InvalidArgumentError, match="read-only"):
        as_buffer(FakeDeviceArray((4, 8), readonly=True), "out", writable=True)


def test_cpu_store_refuses_device_arrays(store, spec):
    seq = store.create_sequence("d")
    k = FakeDeviceArray((1, spec.num_kv_heads, spec.head_dim), "<f4")
    with pytest.raises(pqkv.InvalidArgumentError, match="runs on the CPU"):
        seq.append(0, k, k)


def test_dlpack_producer():
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)

    class OnlyDlpack:
        def __dlpack__(self, stream=None):
            return t.__dlpack__()

        def __dlpack_device__(self):
            return t.__dlpack_device__()

    b = as_buffer(OnlyDlpack(), "q")
    assert b.ptr == t.data_ptr() and b.shape == (3, 4) and b.dtype == pqkv.DType.F32


def test_torch_bfloat16_and_stream_handles():
    torch = pytest.importorskip("torch")
    t = torch.zeros(2, 4, dtype=torch.bfloat16)
    assert as_buffer(t, "q").dtype == pqkv.DType.BF16
    with pytest.raises(pqkv.InvalidArgumentError, match="int64"):
        as_buffer(torch.zeros(2, dtype=torch.int64), "q")
    assert stream_handle(None) is None and stream_handle(5) == 5

    class CupyLikeStream:
        ptr = 1234

    assert stream_handle(CupyLikeStream()) == 1234
    with pytest.raises(pqkv.InvalidArgumentError, match="stream"):
        stream_handle("default")
