"""Property-based fuzzing of every public C entry point of rpc_py._C (hypothesis).

The contract under test (docs/design.md, "Errors"): whatever a caller passes, each call either works
and agrees with an independent model (NumPy/torch, rpc_py.reference, tests/cache_model.py), or raises
a Python exception of the documented kinds. It never crashes and never corrupts memory; the
sanitizer job (ci/sanitize.sh) runs this file under ASan + UBSan to make "never" checkable.

Inputs cover: shapes (including zero-sized dimensions), the three float dtypes, layouts (contiguous,
storage offsets, permuted, zero strides, overlapping as_strided, negative strides, misaligned data,
raw DLPack capsules built with ctypes carrying a byte_offset), out-of-range lengths/keep/kernel sizes,
and objects of the wrong type (including producers whose __dlpack__ misbehaves).

Profiles (registered in conftest.py): "ci" (default; bounded, derandomized) and "long"
(RPC_PY_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py).
"""

from __future__ import annotations

import ctypes
import gc
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from cache_model import CacheModel, ClosedError, check_selection  # noqa: E402
from rpc_py import KVCache, _C  # noqa: E402
from rpc_py import reference as ref  # noqa: E402

# Exceptions the design allows for bad input. OverflowError comes from CPython's own argument
# parsing of ints that do not fit in 64 bits (e.g. start=2**70).
CLEAN_ERRORS = (TypeError, ValueError, IndexError, BufferError, RuntimeError, OverflowError, MemoryError)

DTYPES = ["float32", "float16", "bfloat16"]
TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NP_DT = {"float32": np.float32, "float16": np.float16}
DL_CODE = {"float32": (2, 32), "float16": (2, 16), "bfloat16": (4, 16)}

LAYOUTS = ["contig", "offset", "permuted", "dstride", "zero_stride", "overlap", "np_contig", "np_offset",
           "np_negative", "np_broadcast", "np_overlap", "np_misaligned", "capsule", "capsule_misaligned"]


# ------------------------------------------------------------------------------------------ helpers


def to64(obj):
    """Logical float64 values of a torch tensor / numpy array (our independent read-back)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(torch.float64).numpy().copy()
    return np.asarray(obj, dtype=np.float64).copy()


def view64(view):
    """float64 copy of a rpc_py View (through torch, which reads every dtype we produce)."""
    return torch.from_dlpack(view).to(torch.float64).numpy().copy()


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class RawCapsule:
    """A hand-built DLPack capsule (no deleter) over memory owned by `owner`.

    Everything the capsule points at (struct, shape/strides arrays, the name) is kept alive by this
    object; keep it referenced until the consumer is done (the tests hold it across the call).
    """

    def __init__(self, owner, data_ptr, byte_offset, shape, strides, code, bits, lanes=1, device_type=1,
                 versioned=False, version=(1, 0), readonly=False, ndim=None):
        self.owner = owner
        n = len(shape)
        self.shape = (ctypes.c_int64 * max(n, 1))(*shape)
        self.strides = None if strides is None else (ctypes.c_int64 * max(n, 1))(*strides)
        mt = _DLManagedTensorVersioned() if versioned else _DLManagedTensor()
        dl = mt.dl_tensor
        dl.data = data_ptr
        dl.device = _DLDevice(device_type, 0)
        dl.ndim = n if ndim is None else ndim
        dl.dtype = _DLDataType(code, bits, lanes)
        dl.shape = ctypes.cast(self.shape, ctypes.POINTER(ctypes.c_int64))
        dl.strides = None if self.strides is None else ctypes.cast(self.strides, ctypes.POINTER(ctypes.c_int64))
        dl.byte_offset = byte_offset
        if versioned:
            mt.version = _DLPackVersion(*version)
            mt.flags = 1 if readonly else 0
        self.mt = mt
        self.meta = dict(shape=tuple(shape), code=code, bits=bits, lanes=lanes, device_type=device_type,
                         versioned=versioned, version=version, ndim=dl.ndim, null_data=not data_ptr)
        self.name = b"dltensor_versioned" if versioned else b"dltensor"
        self.capsule = _PyCapsule_New(ctypes.addressof(mt), self.name, None)


def quantize(x64, dtype):
    """x64 rounded to `dtype` and back: the values a tensor of that dtype holds."""
    return torch.from_numpy(np.ascontiguousarray(x64)).to(TORCH_DT[dtype]).to(torch.float64).numpy()


def _bits(x64, dtype):
    t = torch.from_numpy(np.ascontiguousarray(x64)).to(TORCH_DT[dtype]).contiguous()
    if dtype == "float32":
        return t.numpy().tobytes()
    return t.view(torch.int16).numpy().tobytes()


def capsule_from(x64, dtype, *, offset_elems=3, misaligned=False, versioned=False, null_strides=False):
    """A raw capsule whose data pointer is the start of a block and whose byte_offset points past
    `offset_elems` elements (plus one byte when misaligned) to a C-contiguous copy of x64.

    Returns (RawCapsule, expected float64 values)."""
    es = 4 if dtype == "float32" else 2
    payload = _bits(x64, dtype)
    off = offset_elems * es + (1 if misaligned else 0)
    block = np.zeros(off + len(payload) + 8, np.uint8)
    block[off:off + len(payload)] = np.frombuffer(payload, np.uint8)
    shape = list(x64.shape)
    strides = None
    if not null_strides:
        strides, run = [0] * len(shape), 1
        for i in range(len(shape) - 1, -1, -1):
            strides[i] = run
            run *= shape[i]
    code, bits = DL_CODE[dtype]
    cap = RawCapsule(block, block.ctypes.data, off, shape, strides, code, bits, versioned=versioned)
    return cap, quantize(x64, dtype)


def make_input(x64, dtype, layout):
    """An input tensor holding x64 (rounded to dtype) in the requested memory layout.

    Returns (obj, expected float64 logical values, keepalive). Layouts that cannot express the
    dtype (NumPy has no bfloat16) fall back to a torch layout of the same kind.
    """
    B, H, T, D = x64.shape
    tdt = TORCH_DT[dtype]
    if layout.startswith("np_") and dtype == "bfloat16":
        layout = {"np_contig": "contig", "np_offset": "offset", "np_broadcast": "zero_stride",
                  "np_overlap": "overlap", "np_misaligned": "capsule_misaligned"}.get(layout, "contig")
    if layout == "contig":
        t = torch.from_numpy(x64).to(tdt)
        return t, to64(t), None
    if layout == "offset":
        big = torch.zeros(B + 1, H + 1, T + 3, D + 2, dtype=tdt)
        big[1:, 1:, 2:2 + T, 1:1 + D] = torch.from_numpy(x64).to(tdt)
        t = big[1:, 1:, 2:2 + T, 1:1 + D]
        return t, to64(t), None
    if layout == "permuted":
        t = torch.from_numpy(x64).to(tdt).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        return t, to64(t), None
    if layout == "dstride":
        big = torch.zeros(B, H, T, 2 * D, dtype=tdt)
        big[..., ::2] = torch.from_numpy(x64).to(tdt)
        t = big[..., ::2]
        return t, to64(t), None
    if layout == "zero_stride":
        src = torch.from_numpy(x64[:1, :1, :1]).to(tdt) if T > 0 else torch.zeros(1, 1, 0, D, dtype=tdt)
        t = src.expand(B, H, T, D)
        return t, to64(t), None
    if layout == "overlap":
        base = torch.from_numpy(x64.reshape(-1)).to(tdt)
        if base.numel() == 0:
            return base.reshape(x64.shape), to64(base.reshape(x64.shape)), None
        strides = (H * 2, 2, 1, 1)  # windows of D elements sliding by one: heavy overlap
        need = sum((s - 1) * st_ for s, st_ in zip(x64.shape, strides) if s > 0) + 1
        base = torch.cat([base, torch.zeros(max(0, need - base.numel()), dtype=tdt)])
        t = torch.as_strided(base, x64.shape, strides)
        return t, to64(t), None
    npdt = NP_DT.get(dtype)
    if layout == "np_contig":
        a = x64.astype(npdt)
        return a, to64(a), None
    if layout == "np_offset":
        big = np.zeros((B, H, T + 2, D + 1), npdt)
        big[:, :, 1:1 + T, 1:] = x64
        a = big[:, :, 1:1 + T, 1:]
        return a, to64(a), None
    if layout == "np_negative":
        a = x64.astype(npdt)[:, :, ::-1]
        return a, to64(a), None
    if layout == "np_broadcast":
        a = np.broadcast_to(x64[:, :, :1].astype(npdt), x64.shape) if T > 0 else x64.astype(npdt)
        return a, to64(a), None
    if layout == "np_overlap":
        base = np.concatenate([x64.reshape(-1), np.zeros(D + H * B * 2 + 4)]).astype(npdt)
        a = np.lib.stride_tricks.as_strided(base, x64.shape, (2 * base.itemsize, base.itemsize,
                                                            base.itemsize, base.itemsize))
        return a, to64(a), None
    if layout == "np_misaligned":
        raw = np.zeros(x64.size * np.dtype(npdt).itemsize + 2, np.uint8)
        a = np.frombuffer(raw.data, npdt, count=x64.size, offset=1).reshape(x64.shape)
        a[...] = x64
        return a, to64(a), raw
    if layout == "capsule":
        cap, exp = capsule_from(x64, dtype)
        return cap.capsule, exp, cap
    if layout == "capsule_misaligned":
        cap, exp = capsule_from(x64, dtype, misaligned=True, versioned=True)
        return cap.capsule, exp, cap
    raise AssertionError(layout)


MISALIGNED = ("np_misaligned", "capsule_misaligned")


def must_refuse(obj, layout):
    """True for inputs the contract refuses with ValueError: negative strides (on a dimension of size
    > 1) and data pointers not aligned to the element size (kernels load whole elements)."""
    if layout in MISALIGNED:
        return True
    if isinstance(obj, np.ndarray):
        return any(s < 0 and n > 1 for s, n in zip(obj.strides, obj.shape))
    return False


def finite_floats(shape, draw, scale=2.0):
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).standard_normal(shape) * scale


# Objects that are not DLPack tensors, or are broken ones.
class _RaisingDLPack:
    def __dlpack__(self, **kw):
        raise RuntimeError("producer failure")

    def __dlpack_device__(self):
        return (1, 0)


class _IntDLPack:
    def __dlpack__(self, **kw):
        return 42

    def __dlpack_device__(self):
        return (1, 0)


class _BadDevice:
    def __init__(self, dev):
        self.dev = dev

    def __dlpack__(self, **kw):
        return np.zeros((2, 2), np.float32).__dlpack__(**kw)  # wrong rank: never acceptable

    def __dlpack_device__(self):
        return self.dev

    def __repr__(self):
        return f"_BadDevice({self.dev!r})"


class _LegacyOnly:
    """A pre-1.0 producer: __dlpack__ does not know max_version."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack__(self, stream=None):
        return self.arr.__dlpack__()

    def __dlpack_device__(self):
        return (1, 0)


def _used_capsule():
    cap = np.zeros((1, 1, 1, 1), np.float32).__dlpack__()
    c = KVCache(1, 1, 1, 1)
    c.append(0, cap, np.zeros((1, 1, 1, 1), np.float32))
    return cap  # now named used_dltensor*


def junk_objects():
    return st.sampled_from([
        None, 0, -1, 2**70, 1.5, float("nan"), "keys", b"x", [], [[1.0]], {}, object(), (1, 2),
        np.float32(1.0), np.zeros((2, 2), np.float32), np.zeros((1, 1, 1, 1), np.int8),
        np.zeros((1, 1, 1, 1), np.bool_), np.zeros((1, 1, 1, 1), np.complex64),
        np.zeros((1, 1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.float64),
        torch.zeros(1, 1, 1, 1, dtype=torch.int16), torch.zeros(1, 1, 1, 1, dtype=torch.uint8),
        _RaisingDLPack(), _IntDLPack(), _BadDevice((1, "x")), _BadDevice(None), _BadDevice((3, 0)),
        _BadDevice((2**40, 0)),
        _LegacyOnly(np.zeros((1, 1, 1, 1), np.float64)),
        _used_capsule(),
    ])


def raw_capsules():
    """Hand-built capsules with odd headers: bad dtype codes, lanes, ndim, versions, NULL data."""

    @st.composite
    def build(draw):
        n = draw(st.integers(0, 10))
        shape = draw(st.lists(st.integers(0, 3), min_size=min(n, 8), max_size=min(n, 8)))
        block = np.zeros(4 * int(np.prod(shape) if shape else 1) + 64, np.uint8)
        code = draw(st.sampled_from([0, 1, 2, 4, 5, 6, 255]))
        bits = draw(st.sampled_from([8, 16, 32, 64, 0]))
        lanes = draw(st.sampled_from([1, 1, 1, 2, 0]))
        versioned = draw(st.booleans())
        version = (draw(st.sampled_from([1, 1, 0, 2])), draw(st.integers(0, 5)))
        data = draw(st.sampled_from(["block", "null"]))
        dev = draw(st.sampled_from([1, 1, 1, 2, 3, 13]))
        ndim = draw(st.sampled_from([None, None, None, -1, 9, 100]))
        if ndim is not None and ndim > len(shape):
            ndim = None  # never let C read past our shape array
        cap = RawCapsule(block, block.ctypes.data if data == "block" else None, 0, shape, None, code, bits,
                         lanes, device_type=dev, versioned=versioned, version=version, ndim=ndim)
        return cap

    return build()


def expect_clean(fn, *args, **kwargs):
    """Runs fn; returns (True, result) or (False, exception) for a documented exception kind."""
    try:
        return True, fn(*args, **kwargs)
    except CLEAN_ERRORS as e:
        assert str(e), f"{type(e).__name__} without a message"
        return False, e


SETTINGS = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much], deadline=None)


# ------------------------------------------------------------------------------------------ append


@st.composite
def append_case(draw):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    dtype = draw(st.sampled_from(DTYPES))
    chunks = draw(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
                           min_size=1, max_size=4))
    capacity = draw(st.sampled_from([0, 0, 1, 5, 300]))
    fixed = capacity > 0 and draw(st.booleans())
    return B, H, D, dtype, chunks, capacity, fixed, draw(st.integers(0, 2**31 - 1))


@settings(**SETTINGS)
@given(append_case())
def test_append_any_layout_matches_numpy(case):
    B, H, D, dtype, chunks, capacity, fixed, seed = case
    rng = np.random.default_rng(seed)
    cache = KVCache(2, B, H, D, dtype, capacity=capacity, fixed_capacity=fixed)
    model = CacheModel(2, B, H, D, dtype, capacity=capacity, fixed_capacity=fixed)
    for t, klay, vlay in chunks:
        k_obj, k_exp, k_keep = make_input(rng.standard_normal((B, H, t, D)), dtype, klay)
        v_obj, v_exp, v_keep = make_input(rng.standard_normal((B, H, t, D)), dtype, vlay)
        note(f"append t={t} keys={klay} values={vlay}")
        must_fail = must_refuse(k_obj, klay) or must_refuse(v_obj, vlay)
        overflow = model.would_overflow_fixed(1, t, cache.capacity(1))
        ok, res = expect_clean(cache.append, 1, k_obj, v_obj)
        if must_fail or overflow:
            assert not ok and isinstance(res, ValueError), f"expected ValueError, got {res!r}"
            continue
        assert ok, f"append refused a valid input: {res!r}"
        event(f"append ran ({klay})")
        assert res == model.append(1, k_exp, v_exp)
        del k_keep, v_keep
    assert cache.length(1) == model.layers[1].length == cache.seen(1)
    assert cache.capacity(1) >= cache.length(1)
    np.testing.assert_array_equal(view64(cache.keys(1)), model.layers[1].keys)
    np.testing.assert_array_equal(view64(cache.values(1)), model.layers[1].values)
    assert cache.length(0) == 0


@settings(**SETTINGS)
@given(st.integers(0, 3), junk_objects(), st.booleans())
def test_append_wrong_types_raise(slot, junk, as_values):
    cache = KVCache(1, 1, 1, 1)
    good = np.zeros((1, 1, 1, 1), np.float32)
    args = [0, good, good]
    args[2 if as_values else 1] = junk
    if slot == 3:
        args[0] = junk if not isinstance(junk, int) or isinstance(junk, bool) else 5
        args[1] = good
        args[2] = good
    ok, res = expect_clean(cache.append, *args)
    assert not ok, f"append accepted {junk!r}"
    assert cache.length(0) == 0


@settings(**SETTINGS)
@given(raw_capsules())
def test_raw_capsules_never_crash(cap):
    cache = KVCache(1, 1, 1, 1)
    m = cap.meta
    ok, res = expect_clean(cache.append, 0, cap.capsule, np.zeros((1, 1, 1, 1), np.float32))
    if ok:
        # Only a well-formed float32 [1, 1, 1, 1] CPU tensor with data may be accepted.
        assert (m["code"], m["bits"], m["lanes"], m["device_type"]) == (2, 32, 1, 1), m
        assert m["shape"] == (1, 1, 1, 1) and m["ndim"] == 4 and not m["null_data"], m
        assert not m["versioned"] or m["version"][0] == 1, m
        assert cache.length(0) == 1
    else:
        assert cache.length(0) == 0
        # A refused capsule that was not consumed can still be offered to another consumer.
        expect_clean(_C.select, cap.capsule, 0)
    # A consumed capsule is renamed and must be refused the second time.
    if ok:
        again, err = expect_clean(cache.append, 0, cap.capsule, np.zeros((1, 1, 1, 1), np.float32))
        assert not again and isinstance(err, ValueError), err
    del cap


@settings(**SETTINGS)
@given(st.integers(-3, 3), st.sampled_from([0, 1, 2**45, 2**62]), st.sampled_from(["cpu", "cuda", 1, 2, 7, None]))
def test_allocate_and_layer_indices(layer, capacity, device):
    cache = KVCache(2, 1, 2, 2)
    ok, res = expect_clean(cache.allocate, layer, device, 0, capacity)
    if ok:
        assert 0 <= layer < 2 and device in ("cpu", 1) and capacity <= 1
        assert cache.capacity(layer) == res >= capacity
        assert cache.device(layer) == "cpu"
    else:
        note(repr(res))
    for fn in (cache.keys, cache.values, cache.length, cache.seen, cache.capacity, cache.generation,
               cache.num_queries, cache.device, cache.storage_keys):
        ok, res = expect_clean(fn, layer)
        assert ok == (0 <= layer < 2), (fn, layer, res)


@settings(**SETTINGS)
@given(st.lists(st.integers(-5, 2**63 - 1) | st.sampled_from([1.0, "a", None, True, 2**64]), max_size=4),
       st.integers(1, 3))
def test_set_padding(counts, batch):
    cache = KVCache(1, batch, 1, 1)
    ok, res = expect_clean(cache.set_padding, counts)
    valid = (len(counts) == batch and all(isinstance(c, int) and 0 <= c < 2**63 for c in counts))
    assert ok == valid, (counts, res)
    assert cache.padding == (tuple(int(c) for c in counts) if valid else (0,) * batch)
    cache.reset()
    assert cache.padding == (0,) * batch


@settings(**SETTINGS)
@given(st.dictionaries(st.sampled_from(["num_layers", "batch", "kv_heads", "head_dim", "capacity", "window",
                                        "q_heads", "dtype", "fixed_capacity"]),
                       st.integers(-2, 2**40) | st.sampled_from(["float16", "int64", "bogus", None, 1.5])))
def test_constructor_arguments(kw):
    full = dict(num_layers=1, batch=1, kv_heads=1, head_dim=1)
    full.update(kw)
    ok, res = expect_clean(lambda: KVCache(**full))
    if ok:
        with res as c:
            assert c.num_layers == full["num_layers"] and c.batch == full["batch"]
            # Touch storage only when it is small: the constructor accepts sizes (batch up to 2**24,
            # capacity up to 2**40...) whose zero-filled block would be real, resident memory.
            esize = 4 if c.dtype == "float32" else 2
            block = 2 * c.batch * c.kv_heads * c.head_dim * max(full.get("capacity", 0) or 0, 256) * esize
            if block > 64 << 20:
                return
            c.append(0, torch.zeros(c.batch, c.kv_heads, 0, c.head_dim, dtype=TORCH_DT[c.dtype]),
                     torch.zeros(c.batch, c.kv_heads, 0, c.head_dim, dtype=TORCH_DT[c.dtype]))
        assert c.closed


# ------------------------------------------------------------------------------------------ score


@st.composite
def score_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    R = draw(st.integers(1, 5))
    D = draw(st.sampled_from([1, 2, 3, 8, 16, 33]))
    L = draw(st.integers(1, 40))
    start = draw(st.integers(0, L - 1))
    end = draw(st.integers(start + 1, L))
    dtype = draw(st.sampled_from(DTYPES))
    agg = draw(st.sampled_from(["all", "group"]))
    pool = draw(st.sampled_from(["avg", "max"]))
    ks = draw(st.sampled_from([1, 3, 5, 7, 9, 63]))
    qlay = draw(st.sampled_from(LAYOUTS))
    klay = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hkv, G, R, D, L, start, end, dtype, agg, pool, ks, qlay, klay, seed


@settings(**SETTINGS)
@given(score_case(), st.booleans())
def test_score_matches_reference(case, raw):
    B, Hkv, G, R, D, L, start, end, dtype, agg, pool, ks, qlay, klay, seed = case
    rng = np.random.default_rng(seed)
    q, q_exp, q_keep = make_input(rng.standard_normal((B, Hkv * G, R, D)) * 2, dtype, qlay)
    k, k_exp, k_keep = make_input(rng.standard_normal((B, Hkv, L, D)) * 2, dtype, klay)
    ok, res = expect_clean(_C.score, q, k, start, end, aggregation=agg, pooling=pool, kernel_size=ks, raw=raw)
    if must_refuse(q, qlay) or must_refuse(k, klay):
        assert not ok and isinstance(res, ValueError), res
        return
    assert ok, f"score refused valid input ({qlay}, {klay}): {res!r}"
    pooled_ref, raw_ref = ref.score_reference(torch.from_numpy(q_exp), torch.from_numpy(k_exp), start, end, agg,
                                              pool, ks)
    pooled = res[0] if raw else res
    np.testing.assert_allclose(np.asarray(pooled), pooled_ref.numpy(), rtol=2e-4, atol=2e-6)
    if raw:
        np.testing.assert_allclose(np.asarray(res[1]), raw_ref.numpy(), rtol=2e-4, atol=2e-6)


@settings(**SETTINGS)
@given(st.integers(-3, 45), st.integers(-3, 45), st.sampled_from([-1, 0, 1, 2, 3, 2**31 - 1, 7]),
       st.sampled_from(["all", "group", "none", ""]), st.sampled_from(["avg", "max", "min"]),
       st.sampled_from([(2, 1), (3, 2), (0, 1)]), st.sampled_from([(1, 4), (0, 4), (1, 0), (2, 4)]))
def test_score_bad_sizes_raise(start, end, ks, agg, pool, heads, rd):
    Hq, Hkv = heads
    R, D = rd
    q = np.ones((1, Hq, R, D), np.float32)
    k = np.ones((1, Hkv, 40, 4), np.float32)
    ok, res = expect_clean(_C.score, q, k, start, end, aggregation=agg, pooling=pool, kernel_size=ks)
    valid = (0 <= start < end <= 40 and ks >= 1 and ks % 2 == 1 and agg in ("all", "group")
             and pool in ("avg", "max") and Hkv >= 1 and Hq >= 1 and Hq % Hkv == 0 and R >= 1 and D == 4)
    assert ok == valid, res
    if ok:
        A = 1 if agg == "all" else Hkv
        assert np.asarray(res).shape == (1, A, end - start)
        assert np.all(np.isfinite(res))


@settings(**SETTINGS)
@given(junk_objects(), st.booleans())
def test_score_wrong_types_raise(junk, which):
    q = np.ones((1, 2, 2, 4), np.float32)
    k = np.ones((1, 1, 5, 4), np.float32)
    args = [junk, k] if which else [q, junk]
    ok, res = expect_clean(_C.score, *args, 0, 5)
    assert not ok


# ------------------------------------------------------------------------------------------ select


@st.composite
def select_case(draw):
    B = draw(st.integers(0, 3))
    A = draw(st.integers(0, 3))
    N = draw(st.integers(0, 30))
    pool = draw(st.sampled_from(["normal", "ties", "special"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if pool == "normal":
        s = rng.standard_normal((B, A, N)).astype(np.float32)
    elif pool == "ties":
        s = rng.integers(0, 3, (B, A, N)).astype(np.float32)
    else:
        s = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 1e-45], np.float32), (B, A, N))
    keep = draw(st.integers(-2, N + 2))
    layout = draw(st.sampled_from(["contig", "transposed", "offset", "capsule", "torch"]))
    return s, keep, layout


@settings(**SETTINGS)
@given(select_case())
def test_select_matches_reference(case):
    s, keep, layout = case
    keepalive = None
    if layout == "transposed":
        obj = np.ascontiguousarray(s.transpose(2, 1, 0)).transpose(2, 1, 0)
    elif layout == "offset":
        big = np.zeros((s.shape[0], s.shape[1], s.shape[2] + 3), np.float32)
        big[:, :, 3:] = s
        obj = big[:, :, 3:]
    elif layout == "capsule":
        keepalive, _ = capsule_from(s.astype(np.float64), "float32", offset_elems=5)
        obj = keepalive.capsule
    elif layout == "torch":
        obj = torch.from_numpy(s)
    else:
        obj = s
    ok, res = expect_clean(_C.select, obj, keep)
    N = s.shape[2]
    if not 0 <= keep <= N:
        assert not ok and isinstance(res, ValueError), res
        return
    assert ok, res
    expected = ref.select_reference(torch.from_numpy(s.copy()), keep).numpy()
    got = np.asarray(res)
    assert got.dtype == np.int64 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    del keepalive


# ------------------------------------------------------------------------------------------ compact


@st.composite
def compact_case(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 2, 5, 8]))
    L = draw(st.integers(1, 30))
    start = draw(st.integers(0, L - 1))
    end = draw(st.integers(start + 1, L))
    N = end - start
    keep = draw(st.integers(0, N))
    A = draw(st.sampled_from([1, H]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    idx = np.stack([np.stack([np.sort(rng.choice(N, keep, replace=False)) for _ in range(A)]) for _ in range(B)])
    idx = idx.astype(np.int64).reshape(B, A, keep)
    corrupt = draw(st.sampled_from([None, None, None, "dup", "desc", "neg", "big", "dtype", "shape", "start",
                                    "end", "readonly", "dstride"]))
    dtype = draw(st.sampled_from(DTYPES))
    lib = draw(st.sampled_from(["numpy", "torch", "torch_offset"]))
    return B, H, D, L, start, end, keep, A, idx, corrupt, dtype, lib, seed


@settings(**SETTINGS)
@given(compact_case())
def test_compact_matches_reference_or_refuses_untouched(case):
    B, H, D, L, start, end, keep, A, idx, corrupt, dtype, lib, seed = case
    rng = np.random.default_rng(seed + 1)
    kx, vx = rng.standard_normal((B, H, L, D)), rng.standard_normal((B, H, L, D))
    if lib == "numpy" and dtype != "bfloat16":
        k, v = kx.astype(NP_DT[dtype]), vx.astype(NP_DT[dtype])
    elif lib == "torch_offset":
        kb = torch.zeros(B, H, L + 2, D, dtype=TORCH_DT[dtype])
        vb = torch.zeros(B, H + 1, L, D, dtype=TORCH_DT[dtype])
        kb[:, :, 2:] = torch.from_numpy(kx).to(TORCH_DT[dtype])
        vb[:, 1:] = torch.from_numpy(vx).to(TORCH_DT[dtype])
        k, v = kb[:, :, 2:], vb[:, 1:]
    else:
        k, v = torch.from_numpy(kx).to(TORCH_DT[dtype]), torch.from_numpy(vx).to(TORCH_DT[dtype])
    k_before, v_before = to64(k), to64(v)
    indices = idx.copy()
    s, e = start, end
    must_fail = corrupt is not None
    if corrupt == "dup" and keep >= 2:
        indices[..., 1] = indices[..., 0]
    elif corrupt == "desc" and keep >= 2:
        indices = indices[..., ::-1].copy()
    elif corrupt == "neg" and keep >= 1:
        indices[..., 0] = -1
    elif corrupt == "big" and keep >= 1:
        indices[..., -1] = end - start
    elif corrupt == "dtype":
        indices = indices.astype(np.int32)
    elif corrupt == "shape":
        indices = indices.reshape(B, A, keep, 1)
    elif corrupt == "start":
        s = -1
    elif corrupt == "end":
        e = L + 1
    elif corrupt == "readonly" and isinstance(k, np.ndarray):
        k.flags.writeable = False
    elif corrupt == "dstride":
        k = torch.from_numpy(np.repeat(k_before, 2, axis=3)).to(TORCH_DT[dtype])[..., ::2] if D > 1 else k
        must_fail = D > 1
    else:
        must_fail = False
    ok, res = expect_clean(_C.compact, k, v, indices, s, e)
    if must_fail:
        assert not ok, f"compact accepted corrupt input ({corrupt})"
        # Validation happens before memory is touched.
        np.testing.assert_array_equal(to64(k), k_before)
        np.testing.assert_array_equal(to64(v), v_before)
        return
    if corrupt == "dtype" and not ok:
        return  # int32 indices may be refused with a clean error
    assert ok, f"compact refused valid input: {res!r}"
    new_len = start + keep + (L - end)
    assert res == new_len
    ek, ev = ref.compact_reference(torch.from_numpy(k_before), torch.from_numpy(v_before),
                                   torch.from_numpy(idx), start, end)
    np.testing.assert_array_equal(to64(k)[:, :, :new_len], ek.numpy())
    np.testing.assert_array_equal(to64(v)[:, :, :new_len], ev.numpy())


# ------------------------------------------------------------------------------------------ DLPack export


@settings(**SETTINGS)
@given(st.sampled_from(DTYPES), st.integers(0, 5), st.sampled_from([None, (1, 0), (0, 8), (2, 0), "x", (1,)]),
       st.sampled_from([None, False, True]), st.sampled_from([None, (1, 0), (2, 0), (1, 1), "cpu"]),
       st.sampled_from([None, -1, 0, 1, "s"]))
def test_view_dlpack_arguments(dtype, t, max_version, copy, dl_device, stream):
    cache = KVCache(1, 2, 1, 3, dtype)
    x = torch.randn(2, 1, t, 3).to(TORCH_DT[dtype])
    cache.append(0, x, x)
    view = cache.keys(0)
    kw = {}
    for name, val in (("max_version", max_version), ("copy", copy), ("dl_device", dl_device), ("stream", stream)):
        if val is not None:
            kw[name] = val
    ok, cap = expect_clean(view.__dlpack__, **kw)
    if ok:
        # Whatever we exported must be consumable and hold the appended values.
        assert type(cap).__name__ == "PyCapsule"
        c2 = KVCache(1, 2, 1, 3, dtype)
        c2.append(0, cap, x)
        assert torch.equal(torch.from_dlpack(c2.keys(0)), x)
    del cap
    assert torch.equal(torch.from_dlpack(view), x)
    assert view.__dlpack_device__() == (1, 0)


# ------------------------------------------------------------------------------------------ state machine


class CacheMachine(RuleBasedStateMachine):
    """Random sequences of cache operations, checked step by step against tests/cache_model.py."""

    @initialize(L=st.integers(1, 2), B=st.integers(1, 2), H=st.integers(1, 2), G=st.integers(1, 2),
                D=st.sampled_from([2, 4, 8]), dtype=st.sampled_from(DTYPES), window=st.sampled_from([0, 1, 2, 3, 4]),
                capacity=st.sampled_from([0, 0, 3, 40]), fixed=st.booleans(), seed=st.integers(0, 2**31 - 1),
                pass_q_heads=st.booleans(), prefill=st.integers(0, 12), queries=st.integers(0, 5))
    def init(self, L, B, H, G, D, dtype, window, capacity, fixed, seed, pass_q_heads, prefill, queries):
        fixed = fixed and capacity > 0
        qh = H * G if pass_q_heads else 0
        self.cache = KVCache(L, B, H, D, dtype, capacity=capacity, fixed_capacity=fixed, window=window,
                             q_heads=qh)
        self.model = CacheModel(L, B, H, D, dtype, capacity=capacity, fixed_capacity=fixed, window=window,
                                q_heads=qh)
        self.G = G
        self.rng = np.random.default_rng(seed)
        self.views = []  # (view, expected float64 at take time or None, generation at take time, layer)
        # A prompt and some queries on layer 0, so that compress is reachable in few steps.
        self.append(0, prefill, "contig", "contig")
        if self.model.window > 0:
            self.record_query(0, queries, "contig", 0)

    @rule(layer=st.integers(0, 1), steps=st.integers(1, 4))
    def decode(self, layer, steps):
        """Decoding steps: one token and one query each, as the HF integration does."""
        for _ in range(steps):
            self.append(layer, 1, "contig", "offset")
            if self.model.window > 0:
                self.record_query(layer, 1, "permuted", 0)

    def _closed_call(self, fn, *args, **kwargs):
        with pytest.raises(ValueError, match="closed"):
            fn(*args, **kwargs)

    layer = st.integers(0, 1)

    @rule(layer=layer, t=st.integers(0, 6), klay=st.sampled_from(LAYOUTS), vlay=st.sampled_from(LAYOUTS))
    def append(self, layer, t, klay, vlay):
        m = self.model
        layer %= m.num_layers
        k, ke, kk = make_input(self.rng.standard_normal((m.B, m.H, t, m.D)), m.dtype, klay)
        v, ve, vk = make_input(self.rng.standard_normal((m.B, m.H, t, m.D)), m.dtype, vlay)
        if m.closed:
            return self._closed_call(self.cache.append, layer, k, v)
        cap_before = self.cache.capacity(layer)
        gen_before = self.cache.generation(layer)
        ok, res = expect_clean(self.cache.append, layer, k, v)
        if must_refuse(k, klay) or must_refuse(v, vlay) or m.would_overflow_fixed(layer, t, cap_before):
            assert not ok and isinstance(res, ValueError), res
            assert self.cache.capacity(layer) == cap_before
            return
        assert ok, res
        assert res == m.append(layer, ke, ve)
        grew = self.cache.capacity(layer) != cap_before
        assert (self.cache.generation(layer) != gen_before) == grew
        if m.fixed:
            assert self.cache.capacity(layer) == (cap_before or m.capacity0)

    @rule(layer=layer, t=st.integers(0, 6), lay=st.sampled_from(LAYOUTS), heads_off=st.sampled_from([0, 0, 0, 1]))
    def record_query(self, layer, t, lay, heads_off):
        m = self.model
        layer %= m.num_layers
        Hq = m.H * self.G + heads_off
        q, qe, qk = make_input(self.rng.standard_normal((m.B, Hq, t, m.D)), m.dtype, lay)
        if m.closed:
            return self._closed_call(self.cache.record_query, layer, q)
        ok, res = expect_clean(self.cache.record_query, layer, q)
        fixed_heads = m.q_heads or (Hq if Hq % m.H == 0 else None)
        if m.window == 0 or must_refuse(q, lay) or heads_off or fixed_heads != Hq:
            assert not ok and isinstance(res, ValueError), res
            return
        assert ok, res
        assert res == m.record_query(layer, qe)
        assert self.cache.q_heads == m.q_heads

    @rule(layer=layer, start_frac=st.floats(0, 1), bad_start=st.sampled_from([0, 0, 0, 0, 1, -1]),
          keep_frac=st.floats(0, 1), agg=st.sampled_from(["all", "group"]), pool=st.sampled_from(["avg", "max"]),
          ks=st.sampled_from([1, 3, 7, 7, 2]), bad_keep=st.sampled_from([0, 0, 0, 0, 1]))
    def compress(self, layer, start_frac, bad_start, keep_frac, agg, pool, ks, bad_keep):
        m = self.model
        layer %= m.num_layers
        ly = m.layers[layer]
        avail = max(ly.length - m.window, 0)
        start = int(start_frac * max(avail - 1, 0))
        if bad_start:
            start = -1 if bad_start < 0 else avail
        if m.closed:
            return self._closed_call(self.cache.compress, layer, start, 0)
        N = ly.length - m.window - start
        keep = int(keep_frac * max(N, 0)) + (N + 1 if bad_keep else 0)
        ok, res = expect_clean(self.cache.compress, layer, start, keep, aggregation=agg, pooling=pool,
                               kernel_size=ks, return_details=True)
        if not (m.can_compress(layer, start) and 0 <= keep <= N and ks % 2 == 1):
            event("compress refused")
            assert not ok and isinstance(res, ValueError), res
            return
        assert ok, res
        event("compress ran")
        new_len, scores, indices = res
        pooled = m.oracle_scores(layer, start, agg, pool, ks)
        check_selection(pooled, np.asarray(scores), np.asarray(indices), keep)
        assert new_len == m.compress(layer, start, np.asarray(indices))

    @rule(layer=layer)
    def take_view(self, layer):
        m = self.model
        layer %= m.num_layers
        if m.closed:
            return self._closed_call(self.cache.keys, layer)
        v = self.cache.keys(layer)
        self.views.append((v, m.layers[layer].keys.copy(), self.cache.generation(layer), layer,
                           m.layers[layer].length))
        self.views = self.views[-4:]

    @rule(layer=layer, extra=st.integers(0, 50))
    def grow(self, layer, extra):
        m = self.model
        layer %= m.num_layers
        if m.closed:
            return self._closed_call(self.cache.allocate, layer, "cpu", 0, 1)
        cap = self.cache.capacity(layer)
        gen = self.cache.generation(layer)
        ok, res = expect_clean(self.cache.allocate, layer, "cpu", 0, cap + extra)
        if ok:
            assert res == self.cache.capacity(layer) >= cap + extra
            assert (self.cache.generation(layer) != gen) == (res != cap)
            m.layers[layer].placed = True
        else:
            assert isinstance(res, ValueError) and m.fixed and extra > 0, res

    @rule(counts=st.lists(st.integers(0, 100), min_size=1, max_size=3))
    def set_padding(self, counts):
        m = self.model
        if m.closed:
            return self._closed_call(self.cache.set_padding, counts)
        ok, res = expect_clean(self.cache.set_padding, counts)
        assert ok == (len(counts) == m.B), res
        if ok:
            m.set_padding(counts)

    @rule(then_close=st.sampled_from([False] * 6 + [True]))
    def reset(self, then_close):
        m = self.model
        if then_close:
            return self.close()
        if m.closed:
            return self._closed_call(self.cache.reset)
        caps = [self.cache.capacity(i) for i in range(m.num_layers)]
        self.cache.reset()
        m.reset()
        assert caps == [self.cache.capacity(i) for i in range(m.num_layers)]

    def close(self):
        self.cache.close()
        self.cache.close()  # idempotent
        self.model.close()
        assert self.cache.closed
        gc.collect()

    @invariant()
    def agrees_with_model(self):
        m = getattr(self, "model", None)
        if m is None:
            return
        # Views stay readable whatever happened since (growth, reset, close): they own their storage.
        # Their contents may legitimately change in place (compaction), so only the shape is pinned;
        # under ASan a dangling view would be reported right here.
        for v, exp, gen, layer, length in self.views:
            assert view64(v).shape == exp.shape
        if m.closed:
            return
        c = self.cache
        assert c.padding == m.padding
        for i, ly in enumerate(m.layers):
            assert c.length(i) == ly.length and c.seen(i) == ly.seen
            assert c.capacity(i) >= ly.length
            assert c.num_queries(i) == m.num_queries(i)
            if ly.length:
                np.testing.assert_array_equal(view64(c.keys(i)), ly.keys)
                np.testing.assert_array_equal(view64(c.values(i)), ly.values)
                dl = np.from_dlpack(c.device_lengths(i))
                assert list(dl) == [ly.length, ly.seen]
            if m.num_queries(i) == m.window and m.window > 0:
                ring = view64(c.queries(i))
                # Same query rows per (batch, head); the ring's slot order is free. Rows are compared
                # as sorted lists of row tuples, which is order-insensitive but keeps rows intact.
                for bh in range(m.B * m.q_heads):
                    got = sorted(map(tuple, ring.reshape(-1, m.window, m.D)[bh]))
                    want = sorted(map(tuple, ly.queries.reshape(-1, m.window, m.D)[bh]))
                    assert got == want, f"query ring of layer {i} differs from the last {m.window} queries"

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()


CacheMachine.TestCase.settings = settings(settings.default, **SETTINGS)
TestCacheMachine = CacheMachine.TestCase
