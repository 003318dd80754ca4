"""The DLPack bridge: consuming foreign tensors (torch, NumPy, hand-made capsules) and exporting Views.

Hand-made capsules are built with ctypes from the DLPack struct layout, so the consumer's checks
(version, lanes, dtype, device) and its ownership handling (rename to used_*, deleter called exactly
once) are tested against an independent implementation of the spec rather than against our own producer.
"""

import ctypes
import gc
import sys
import threading

import numpy as np
import pytest

from rpc_py import KVCache

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------------------- ctypes DLPack


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DELETER_V = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))
DLManagedTensorVersioned._fields_ = [
    ("version", DLPackVersion),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", DELETER_V),
    ("flags", ctypes.c_uint64),
    ("dl_tensor", DLTensor),
]

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_NAME_V = b"dltensor_versioned"


class HandMade:
    """Owns a NumPy buffer and a versioned managed tensor describing it; counts deleter calls."""

    def __init__(self, array, *, version=(1, 0), code=2, bits=32, lanes=1, device_type=1, byte_offset=0,
                 strides=True):
        self.array = array
        self.deleted = 0
        self.shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        self.strides = (ctypes.c_int64 * array.ndim)(*[s // array.itemsize for s in array.strides])
        self.mt = DLManagedTensorVersioned()
        self.mt.version = DLPackVersion(*version)
        self._deleter = DELETER_V(self._on_delete)
        self.mt.deleter = self._deleter
        t = self.mt.dl_tensor
        t.data = array.ctypes.data
        t.device = DLDevice(device_type, 0)
        t.ndim = array.ndim
        t.dtype = DLDataType(code, bits, lanes)
        t.shape = self.shape
        t.strides = self.strides if strides else None
        t.byte_offset = byte_offset

    def _on_delete(self, ptr):
        self.deleted += 1

    def capsule(self):
        # No capsule destructor: if nobody consumes it, nothing is freed (the test owns the memory).
        return _PyCapsule_New(ctypes.addressof(self.mt), _NAME_V, None)


def capsule_name(cap):
    get = ctypes.pythonapi.PyCapsule_GetName
    get.restype = ctypes.c_char_p
    get.argtypes = [ctypes.py_object]
    return get(cap).decode()


# ----------------------------------------------------------------------------------------- consumer


def test_hand_made_capsule_is_consumed_and_deleted_once(rng):
    a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    h = HandMade(a)
    cap = h.capsule()
    cache = KVCache(1, 2, 3, 5)
    cache.append(0, cap, a)
    assert capsule_name(cap) == "used_dltensor_versioned"
    assert h.deleted == 1
    np.testing.assert_array_equal(np.from_dlpack(cache.keys(0)), a)
    with pytest.raises(ValueError, match="keys: expected an unconsumed DLPack capsule"):
        cache.append(0, cap, a)  # a used capsule cannot be consumed twice
    assert h.deleted == 1


def test_byte_offset_and_implicit_strides(rng):
    a = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    big = np.concatenate([np.zeros(7, np.float32), a.ravel()])
    h = HandMade(big[7:].reshape(a.shape), strides=False)
    h.mt.dl_tensor.data = big.ctypes.data
    h.mt.dl_tensor.byte_offset = 7 * 4
    cache = KVCache(1, 1, 2, 4)
    cache.append(0, h.capsule(), a)
    np.testing.assert_array_equal(np.from_dlpack(cache.keys(0)), a)
    assert h.deleted == 1


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(version=(2, 0)), "keys: unsupported DLPack version 2.0"),
        (dict(lanes=4), "keys: expected a scalar dtype \\(lanes == 1\\), got 4 lanes"),
        (dict(code=6, bits=8), "keys: unsupported dtype bool"),
        (dict(code=5, bits=64), "keys: unsupported dtype complex64"),
        (dict(code=1, bits=8), "keys: unsupported dtype uint8"),
        (dict(device_type=4), "keys: expected a CPU or CUDA tensor, got DLPack device type 4"),
    ],
)
def test_consumer_rejects_bad_capsules(kwargs, msg):
    a = np.zeros((1, 1, 2, 4), np.float32)
    h = HandMade(a, **kwargs)
    cache = KVCache(1, 1, 1, 4)
    with pytest.raises(ValueError, match=msg):
        cache.append(0, h.capsule(), a)
    assert cache.length(0) == 0


def test_int_dtypes_are_understood_but_not_cache_dtypes():
    cache = KVCache(1, 1, 1, 4)
    for dt in (torch.int64, torch.int32):
        with pytest.raises(ValueError, match=f"keys: expected dtype float32 \\(the cache dtype\\), got {str(dt)[6:]}"):
            cache.append(0, torch.zeros(1, 1, 2, 4, dtype=dt), torch.zeros(1, 1, 2, 4))


class LegacyProducer:
    """A pre-1.0 producer: no max_version keyword, legacy capsule only. Records the kwargs it got."""

    def __init__(self, t):
        self.t = t
        self.calls = []

    def __dlpack__(self, stream=None):
        self.calls.append(stream)
        return torch.utils.dlpack.to_dlpack(self.t)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


def test_legacy_producer_fallback():
    t = torch.randn(1, 2, 3, 4)
    p = LegacyProducer(t)
    cache = KVCache(1, 1, 2, 4)
    cache.append(0, p, p)
    assert p.calls == [None, None]  # CPU producers get no stream
    assert torch.equal(torch.from_dlpack(cache.values(0)), t)


class StrictCpuProducer:
    """Rejects a stream argument like NumPy does for CPU arrays; demands max_version."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        assert stream is None, "CPU producers must not get a stream"
        assert max_version == (1, 0)
        return self.a.__dlpack__(max_version=max_version)

    def __dlpack_device__(self):
        return (1, 0)


def test_cpu_producer_gets_no_stream_even_if_given(rng):
    a = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    cache = KVCache(1, 1, 1, 4)
    cache.append(0, StrictCpuProducer(a), a, stream=12345)  # stream is a CUDA concern; ignored on CPU
    np.testing.assert_array_equal(np.from_dlpack(cache.keys(0)), a)


def test_producer_errors_propagate():
    class Broken:
        def __dlpack__(self, **kw):
            raise BufferError("no export today")

        def __dlpack_device__(self):
            return (1, 0)

    class NotACapsule:
        def __dlpack__(self, **kw):
            return 42

        def __dlpack_device__(self):
            return (1, 0)

    cache = KVCache(1, 1, 1, 4)
    with pytest.raises(BufferError, match="no export today"):
        cache.append(0, Broken(), Broken())
    with pytest.raises(TypeError, match="keys: __dlpack__\\(\\) returned int, expected a capsule"):
        cache.append(0, NotACapsule(), NotACapsule())


def test_inputs_are_released_after_use():
    t = torch.randn(1, 1, 3, 4)
    cache = KVCache(1, 1, 1, 4)
    before = sys.getrefcount(t)
    for _ in range(50):
        cache.append(0, t, t)
    gc.collect()
    assert sys.getrefcount(t) == before
    a = np.zeros((1, 1, 3, 4), np.float32)
    before = sys.getrefcount(a)
    for _ in range(50):
        cache.append(0, a, a)
    assert sys.getrefcount(a) == before


# ----------------------------------------------------------------------------------------- producer


def test_view_to_numpy_and_torch_share_memory():
    cache = KVCache(1, 2, 2, 4)
    k = torch.randn(2, 2, 3, 4)
    cache.append(0, k, k)
    view = cache.keys(0)
    a = np.from_dlpack(view)
    t = torch.from_dlpack(view)
    assert a.ctypes.data == t.data_ptr() == view.ptr
    t[0, 1, 2, 3] = -9.0
    assert a[0, 1, 2, 3] == -9.0
    assert a.strides == tuple(s * 4 for s in view.strides)


def test_exported_tensor_keeps_view_alive_and_releases_it():
    cache = KVCache(1, 1, 1, 4)
    cache.append(0, torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    view = cache.keys(0)
    base = sys.getrefcount(view)
    tensors = [torch.from_dlpack(view) for _ in range(10)]
    assert sys.getrefcount(view) == base + 10
    del tensors
    gc.collect()
    assert sys.getrefcount(view) == base


def test_deleter_from_another_thread():
    cache = KVCache(1, 1, 1, 4)
    cache.append(0, torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    view = cache.keys(0)
    base = sys.getrefcount(view)
    box = [torch.from_dlpack(view)]

    def drop():
        box.clear()  # the torch tensor dies here, running our deleter on this thread

    th = threading.Thread(target=drop)
    th.start()
    th.join()
    gc.collect()
    assert sys.getrefcount(view) == base


def test_view_roundtrip_through_our_consumer():
    """A View is itself a DLPack producer our consumer accepts (versioned capsule path)."""
    src = KVCache(1, 1, 2, 4, "bfloat16")
    k = torch.randn(1, 2, 5, 4).to(torch.bfloat16)
    src.append(0, k, k)
    dst = KVCache(1, 1, 2, 4, "bfloat16")
    dst.append(0, src.keys(0), src.values(0))
    assert torch.equal(torch.from_dlpack(dst.keys(0)), k)


def test_view_survives_its_cache_for_numpy():
    cache = KVCache(1, 1, 1, 4, "float16")
    k = np.arange(8, dtype=np.float16).reshape(1, 1, 2, 4)
    cache.append(0, k, k)
    view = cache.values(0)
    del cache
    gc.collect()
    np.testing.assert_array_equal(np.from_dlpack(view), k)
