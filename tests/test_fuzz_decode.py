"""Property-based fuzzing of the decode-step entry points of rpc_py._C (hypothesis), on the CPU:
decode_attention, decode_workspace_size, append_at_length and ring_write.

Contract (docs/design.md, "Errors"): every call either works and agrees with an independent model
(rpc_py.decode_reference's SDPA oracle for attention, plain NumPy/Python for the writes), or raises one
of the documented exception kinds. It never crashes and never writes outside what it was given: every
written tensor is a strided view into a larger buffer whose other elements (sentinels before and after,
gaps between rows) are compared bit for bit after the call, and a call that raises must leave its
outputs (and `lengths`) untouched. ci/sanitize.sh runs this file under ASan + UBSan, which also turns
signed overflow in the index arithmetic (huge lengths/offsets/shapes) into a failure.

Each drawn case lists its faults; a "hard" fault must make the call raise one of the kinds that fault
allows, a "soft" one (an ambiguity the contract does not pin down, such as K/V storages with different
strides) may raise or may run, and if it runs the result must still be right. A case without faults
must run and match the model.

Profiles as in tests/test_fuzz.py: "ci" (default, bounded, derandomized) and "long"
(RPC_PY_FUZZ_PROFILE=long python -m pytest tests/test_fuzz_decode.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rpc_py import _C  # noqa: E402
from rpc_py.decode_reference import decode_attention_ref  # noqa: E402
from test_fuzz import (  # noqa: E402
    CLEAN_ERRORS,
    LAYOUTS,
    TORCH_DT,
    RawCapsule,
    junk_objects,
    make_input,
    must_refuse,
)

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
DTYPES = ["float32", "float16", "bfloat16"]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64, torch.int64: torch.int64, torch.int32: torch.int32}
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
SENTINEL = -768.0  # exactly representable in every float dtype used here

# A fraction of the profile's example budget per test keeps the file near 30 s in "ci" on 2 cores.
_BUDGET = settings().max_examples


def budget(frac):
    return settings(max_examples=max(10, int(_BUDGET * frac)), deadline=None)


def i64(value):
    """value wrapped to int64 (two's complement), as torch's int64 arithmetic does."""
    return (value + 2**63) % 2**64 - 2**63


# ------------------------------------------------------------------------------- guarded outputs

OUT_LAYOUTS = ["contig", "permuted", "gapped", "transposed_last"]


def _contig_strides(shape):
    strides, run = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = run
        run *= max(shape[i], 1)
    return strides


def layout_strides(shape, layout):
    """Element strides of a non-overlapping layout of `shape`."""
    if layout == "contig":
        return _contig_strides(shape)
    if layout == "permuted":  # dims 1 and 2 swapped in memory (HF's [B, T, H, D] under a [B, H, T, D] view)
        s = _contig_strides([shape[0], shape[2], shape[1], shape[3]])
        return [s[0], s[2], s[1], s[3]]
    if layout == "gapped":  # every row padded by 3 elements, every head by 5: gaps must stay untouched
        d = shape[3] + 3
        s2 = d
        s1 = s2 * max(shape[2], 1) + 5
        s0 = s1 * max(shape[1], 1) + 2
        return [s0, s1, s2, 1]
    if layout == "transposed_last":  # head_dim not innermost
        s = _contig_strides([shape[0], shape[1], shape[3], shape[2]])
        return [s[0], s[1], s[3], s[2]]
    raise AssertionError(layout)


class Guarded:
    """A strided view into a larger buffer; everything in the buffer outside the view is a guard."""

    def __init__(self, shape, strides, tdtype, fill, front=7, back=9):
        foot = 0 if any(n == 0 for n in shape) else 1 + sum((n - 1) * s for n, s in zip(shape, strides))
        self.buf = torch.full((front + foot + back,), SENTINEL, dtype=tdtype)
        self.view = torch.as_strided(self.buf, shape, strides, front)
        if fill is not None:
            self.view.copy_(fill)
        idx = torch.as_strided(torch.arange(self.buf.numel()), shape, strides, front).reshape(-1)
        self.mask = torch.zeros(self.buf.numel(), dtype=torch.bool)
        self.mask[idx] = True
        self.snap = self.buf.clone()

    def _bits(self, t):
        return t.view(BITS[t.dtype])

    def guards_intact(self):
        outside = ~self.mask
        return torch.equal(self._bits(self.buf)[outside], self._bits(self.snap)[outside])

    def untouched(self):
        return torch.equal(self._bits(self.buf), self._bits(self.snap))


def check_guards(*guarded):
    for g in guarded:
        assert g.guards_intact(), "a call wrote outside the tensor it was given"


def check_untouched(*guarded):
    for g in guarded:
        assert g.untouched(), "a call that raised still wrote into its output"


def readonly_numpy(shape, dtype):
    a = np.zeros(shape, np.float32 if dtype == "bfloat16" else np.dtype(dtype))
    a.flags.writeable = False
    return a


def readonly_capsule(shape, dtype):
    """A versioned DLPack capsule flagged read-only (bfloat16 too, which NumPy cannot express)."""
    es = 4 if dtype == "float32" else 2
    code, bits = {"float32": (2, 32), "float16": (2, 16), "bfloat16": (4, 16)}[dtype]
    block = np.zeros(es * int(np.prod(shape)) + 64, np.uint8)
    return RawCapsule(block, block.ctypes.data, 0, list(shape), _contig_strides(shape), code, bits,
                      versioned=True, readonly=True)


class Faults:
    """What is wrong with a drawn case: hard faults must raise one of their kinds, soft ones may."""

    def __init__(self):
        self.hard, self.soft = [], []

    def add(self, what, kinds=(ValueError,), soft=False):
        (self.soft if soft else self.hard).append((what, tuple(kinds)))

    def allowed(self):
        kinds = set()
        for _, k in self.hard + self.soft:
            kinds.update(k)
        return tuple(kinds)

    def __repr__(self):
        return f"hard={[w for w, _ in self.hard]} soft={[w for w, _ in self.soft]}"


def call_and_classify(fn, faults, *args, **kwargs):
    """Runs fn. Returns True when it ran, False when it raised as `faults` allow; fails otherwise."""
    note(f"faults: {faults!r}")
    try:
        fn(*args, **kwargs)
    except CLEAN_ERRORS as e:
        assert str(e), f"{type(e).__name__} without a message"
        assert faults.hard or faults.soft, f"a valid call raised {type(e).__name__}: {e}"
        assert isinstance(e, faults.allowed()), f"{faults!r} but got {type(e).__name__}: {e}"
        event(f"raised {type(e).__name__}")
        return False
    assert not faults.hard, f"call accepted a case with {faults!r}"
    event("ran")
    return True


# ------------------------------------------------------------------------------- shared draws

def lengths_value(draw, cap):
    return draw(st.one_of(st.integers(0, cap + 1), st.sampled_from([I64_MIN, -1, cap, cap + 1, I64_MAX,
                                                                     I64_MAX - 1, 2**62])))


LENGTHS_KINDS = ["good", "good", "good", "good", "good", "one", "empty", "int32", "float", "2d", "strided",
                 "readonly", "junk"]


def make_lengths(draw, kind, pos, seen, faults, *, written, min_len):
    """(lengths object, Guarded or None). The good one sits in a guarded int64 buffer."""
    if kind == "good":
        g = Guarded((2,), (1,), torch.int64, torch.tensor([pos, seen]), front=2, back=2)
        return g.view, g
    if kind == "one":
        g = Guarded((1,), (1,), torch.int64, torch.tensor([pos]), front=2, back=2)
        if min_len > 1:
            faults.add("lengths of one element")
        return g.view, g
    if kind == "readonly":
        a = np.array([pos, seen], np.int64)
        a.flags.writeable = False
        if written:
            faults.add("read-only lengths", (BufferError,))
        return a, None
    faults.add(f"lengths {kind}", (ValueError, TypeError, BufferError, RuntimeError))
    if kind == "empty":
        return torch.zeros(0, dtype=torch.int64), None
    if kind == "int32":
        return torch.tensor([min(max(pos, -(2**31)), 2**31 - 1)] * 2, dtype=torch.int32), None
    if kind == "float":
        return torch.tensor([1.0, 1.0]), None
    if kind == "2d":
        return torch.tensor([[pos, seen]]), None
    if kind == "strided":
        return torch.tensor([pos, 0, seen, 0])[::2], None
    return draw(junk_objects()), None


# ------------------------------------------------------------------------------- decode_attention

Q_LAYOUTS = ["contig", "offset", "permuted", "zero_stride", "overlap", "np_contig", "np_offset", "np_negative",
             "np_broadcast", "np_misaligned", "capsule", "capsule_misaligned"]


CLEAN_LAYOUTS = [x for x in LAYOUTS if x not in ("dstride", "np_negative", "np_misaligned", "capsule_misaligned")]


def valid_only(draw, case, choices):
    """Half of the cases are redrawn from valid choices only, so that the success path (and its
    comparison with the model) is exercised as much as the error paths."""
    if draw(st.booleans()):
        for key, strategy in choices.items():
            case[key] = draw(strategy)
    return case


@st.composite
def decode_case(draw):
    case = dict(
        B=draw(st.integers(0, 3)), Hkv=draw(st.integers(1, 3)), G=draw(st.integers(1, 3)),
        D=draw(st.sampled_from([1, 2, 3, 8, 16])), cap=draw(st.sampled_from([0, 1, 2, 5, 17, 24])),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**31 - 1)),
        q_layout=draw(st.sampled_from(Q_LAYOUTS)), k_layout=draw(st.sampled_from(LAYOUTS)),
        v_layout=draw(st.sampled_from(LAYOUTS)),
        out_kind=draw(st.sampled_from(OUT_LAYOUTS * 3 + ["zero_stride", "overlap", "readonly_np", "readonly_cap",
                                                         "wrong_dtype", "int_dtype", "f64", "junk"])),
        mismatch=draw(st.sampled_from([None] * 8 + ["q_tokens", "k_batch", "v_cap", "out_dim", "heads",
                                                    "d_zero", "hq_zero", "k_3d"])),
        lengths_kind=draw(st.sampled_from(LENGTHS_KINDS)),
        pad_kind=draw(st.sampled_from(["none", "none", "good", "good", "good", "short", "int32", "float", "2d",
                                       "junk"])),
        scale=draw(st.one_of(st.none(), st.floats(-1.5, 1.5), st.sampled_from(
            [0.0, 0, 1, math.nan, math.inf, -math.inf, 1e300, -1e300, 3e38, "x", 2**2000]))),
        splits=draw(st.sampled_from([0, 0, 0, 1, 7, 1024, 65535, -1, 65536, I64_MAX, I64_MIN])),
        reference=draw(st.booleans()),
        workspace=draw(st.sampled_from([None, "small", "f64", "junk"])),
    )
    return valid_only(draw, case, dict(
        q_layout=st.sampled_from(CLEAN_LAYOUTS), k_layout=st.sampled_from(CLEAN_LAYOUTS),
        v_layout=st.sampled_from(CLEAN_LAYOUTS), out_kind=st.sampled_from(OUT_LAYOUTS), mismatch=st.none(),
        lengths_kind=st.sampled_from(["good", "one"]), pad_kind=st.sampled_from(["none", "good"]),
        scale=st.one_of(st.none(), st.floats(-1.5, 1.5)), splits=st.sampled_from([0, 1, 7, 65535])))


@budget(1.0)
@given(decode_case(), st.data())
def test_decode_attention_fuzz(c, data):
    draw = data.draw
    B, Hkv, G, D, cap, dtype = c["B"], c["Hkv"], c["G"], c["D"], c["cap"], c["dtype"]
    tdt = TORCH_DT[dtype]
    Hq = Hkv * G
    faults = Faults()
    rng = np.random.default_rng(c["seed"])
    qB, qHq, qT, qD = B, Hq, 1, D
    kshape, vshape, oshape = [B, Hkv, cap, D], [B, Hkv, cap, D], [B, Hq, 1, D]
    mm = c["mismatch"]
    if mm == "q_tokens":
        qT = 2
        faults.add("q has 2 tokens")
    elif mm == "k_batch":
        kshape[0] += 1
        faults.add("keys batch")
    elif mm == "v_cap":
        vshape[2] += 1
        faults.add("values capacity")
    elif mm == "out_dim":
        oshape[3] += 1
        faults.add("out head_dim")
    elif mm == "heads":
        kshape[1] = vshape[1] = Hq + 1
        faults.add("kv heads do not divide q heads")
    elif mm == "d_zero":
        qD = kshape[3] = vshape[3] = oshape[3] = 0
        faults.add("head_dim 0")
    elif mm == "hq_zero":
        qHq = oshape[1] = 0
        faults.add("no query heads")
    q_obj, q64, q_keep = make_input(rng.standard_normal((qB, qHq, qT, qD)), dtype, c["q_layout"])
    k_obj, k64, k_keep = make_input(rng.standard_normal(kshape), dtype, c["k_layout"])
    v_obj, v64, v_keep = make_input(rng.standard_normal(vshape), dtype, c["v_layout"])
    if mm == "k_3d":
        k_obj = torch.zeros(kshape[:3], dtype=tdt)
        faults.add("keys 3-D")
    for name, obj, lay in (("q", q_obj, c["q_layout"]), ("keys", k_obj, c["k_layout"]),
                           ("values", v_obj, c["v_layout"])):
        if must_refuse(obj, lay):
            faults.add(f"{name} {lay}")
    for name, lay, shape in (("keys", c["k_layout"], kshape), ("values", c["v_layout"], vshape)):
        if lay == "dstride" and shape[3] > 1 and shape[0] > 0 and shape[2] > 0 and mm != "k_3d":
            faults.add(f"{name} strided head_dim")

    out_guard = None
    ok_kind = c["out_kind"]
    if ok_kind in OUT_LAYOUTS:
        out_guard = Guarded(oshape, layout_strides(oshape, ok_kind), tdt, torch.tensor(math.nan))
        out_obj = out_guard.view
    elif ok_kind == "zero_stride":
        out_guard = Guarded([1, 1, 1, oshape[3]], [0, 0, 0, 1], tdt, torch.tensor(math.nan))
        out_obj = out_guard.view.expand(oshape)
        if any(n > 1 for n in oshape[:3]):
            faults.add("out zero strides")
    elif ok_kind == "overlap":  # rows overlap by one element: no OOB allowed, values not defined
        strides = [max(oshape[1], 1) * max(oshape[3] - 1, 1), max(oshape[3] - 1, 1), 1, 1]
        out_guard = Guarded(oshape, strides, tdt, None)
        out_obj = out_guard.view
        if oshape[3] > 1 and oshape[1] * oshape[0] > 1:
            faults.add("out overlaps itself", (ValueError,), soft=True)
    elif ok_kind == "readonly_np":
        out_obj = readonly_numpy(oshape, dtype)
        faults.add("read-only out", (BufferError, ValueError))
    elif ok_kind == "readonly_cap":
        out_keep = readonly_capsule(oshape, dtype)
        out_obj = out_keep.capsule
        faults.add("read-only out", (BufferError,))
    elif ok_kind == "wrong_dtype":
        out_obj = torch.zeros(oshape, dtype=torch.float16 if dtype != "float16" else torch.float32)
        faults.add("out dtype")
    elif ok_kind == "int_dtype":
        out_obj = torch.zeros(oshape, dtype=torch.int32)
        faults.add("out int dtype")
    elif ok_kind == "f64":
        out_obj = torch.zeros(oshape, dtype=torch.float64)
        faults.add("out float64")
    else:
        out_obj = draw(junk_objects())
        faults.add("out junk", (TypeError, ValueError, BufferError, RuntimeError))

    length = lengths_value(draw, cap)
    len_obj, len_guard = make_lengths(draw, c["lengths_kind"], length, i64(length + 3), faults, written=False,
                                      min_len=1)

    padding = pad_obj = None
    pk = c["pad_kind"]
    if pk == "good":
        padding = draw(st.lists(st.one_of(st.integers(-2, cap + 2), st.sampled_from([I64_MIN, I64_MAX])),
                                min_size=B, max_size=B))
        pad_obj = torch.tensor(padding, dtype=torch.int64)
    elif pk == "short":
        pad_obj = torch.zeros(B + 1, dtype=torch.int64)
        faults.add("padding length")
    elif pk != "none":
        pad_obj = {"int32": torch.zeros(B, dtype=torch.int32), "float": torch.zeros(B),
                   "2d": torch.zeros(1, B, dtype=torch.int64)}.get(pk)
        if pad_obj is None:
            pad_obj = draw(junk_objects())
        faults.add(f"padding {pk}", (ValueError, TypeError, BufferError, RuntimeError))

    scale = c["scale"]
    if isinstance(scale, str):
        faults.add("scale str", (TypeError,))
    elif isinstance(scale, int) and abs(scale) > 2**1000:
        faults.add("scale too big", (OverflowError,))
    elif scale is not None and (not math.isfinite(scale) or abs(scale) > 3.4e38):
        faults.add("scale not a finite float32", (ValueError,))
    elif scale is not None and abs(scale) > 1e6:
        faults.add("scale overflows float32 scores", (ValueError,), soft=True)
    if not 0 <= c["splits"] <= 65535:
        faults.add("splits", (ValueError, OverflowError))
    # On the CPU the workspace is unused and not inspected (documented): any object is accepted.
    ws = {None: None, "small": torch.zeros(1), "f64": torch.zeros(8, dtype=torch.float64),
          "junk": object()}[c["workspace"]]
    note(f"shapes q={[qB, qHq, qT, qD]} k={kshape} v={vshape} out={oshape} length={length} padding={padding}")

    ran = call_and_classify(_C.decode_attention, faults, q_obj, k_obj, v_obj, out_obj, len_obj, padding=pad_obj,
                            scale=scale, workspace=ws, splits=c["splits"], reference=c["reference"])
    del q_keep, k_keep, v_keep
    if out_guard is not None:
        check_guards(out_guard)
        if not ran:
            check_untouched(out_guard)
    if len_guard is not None:
        check_untouched(len_guard)  # decode_attention only reads lengths
    if not ran or faults.soft:
        return
    ref = decode_attention_ref(torch.from_numpy(q64), torch.from_numpy(k64), torch.from_numpy(v64), length,
                               padding, None if scale is None else float(scale))
    tol = TOL[dtype]
    torch.testing.assert_close(out_guard.view.double(), ref, atol=tol, rtol=tol, equal_nan=False)


# ------------------------------------------------------------------------------- decode_workspace_size

SIZE = st.one_of(st.integers(-2, 9), st.sampled_from([2**16, 2**16 + 1, 2**24, 2**24 + 1, 2**40, 2**40 + 1,
                                                       I64_MAX, I64_MIN, 2**64]))


@budget(0.5)
@given(SIZE, SIZE, SIZE, SIZE, SIZE, st.one_of(st.integers(-1, 9), st.sampled_from([65535, 65536, I64_MAX])))
def test_decode_workspace_size_fuzz(B, Hq, Hkv, D, cap, splits):
    try:
        got = _C.decode_workspace_size(B, Hq, Hkv, D, cap, splits)
    except CLEAN_ERRORS as e:
        assert str(e)
        valid = (0 <= B and 1 <= Hkv and 1 <= Hq and Hq % Hkv == 0 and 1 <= D and 0 <= cap
                 and 0 <= splits <= 65535)
        # A valid request may only be refused for being too large (it would not fit a tensor).
        assert not valid or isinstance(e, (ValueError, OverflowError)) and max(B, Hq, D, cap, splits) > 2**15, e
        return
    s, floats = got
    assert 0 <= B and 1 <= Hkv <= Hq and Hq % Hkv == 0 and 1 <= D and 0 <= cap and 0 <= splits <= 65535
    assert 1 <= s <= 65535 and (splits == 0 or s == splits)
    # Exact: a wrapped (overflowed) product must never come back as a size.
    assert floats == B * Hq * s * (D + 2) and 0 <= floats <= I64_MAX


# ------------------------------------------------------------------------------- append_at_length

STORE_LAYOUTS = ["contig", "permuted", "gapped", "transposed_last"]


@st.composite
def append_case(draw):
    B, H, D, cap = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.sampled_from([0, 1, 2, 5, 8])), \
        draw(st.sampled_from([0, 1, 4, 9]))
    case = dict(
        B=B, H=H, D=D, cap=cap, t=draw(st.integers(0, cap + 2)), dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)), k_layout=draw(st.sampled_from(STORE_LAYOUTS)),
        v_layout=draw(st.sampled_from(STORE_LAYOUTS + ["same"] * 6)),
        src_layouts=(draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS))),
        store_fault=draw(st.sampled_from([None] * 10 + ["readonly_k", "readonly_v", "zero_stride", "int_dtype",
                                                        "f64", "v_dtype", "v_shape", "junk_k", "junk_v"])),
        src_fault=draw(st.sampled_from([None] * 10 + ["k_tokens", "v_tokens", "k_heads", "k_dtype", "junk"])),
        pos=lengths_value(draw, cap),
        seen=draw(st.sampled_from([0, 5, I64_MAX, I64_MAX - 1, I64_MIN, -1])),
        lengths_kind=draw(st.sampled_from(LENGTHS_KINDS)),
    )
    return valid_only(draw, case, dict(
        v_layout=st.just("same"), src_layouts=st.tuples(st.sampled_from(CLEAN_LAYOUTS),
                                                        st.sampled_from(CLEAN_LAYOUTS)),
        store_fault=st.none(), src_fault=st.none(), lengths_kind=st.just("good"),
        pos=st.one_of(st.integers(0, cap + 1), st.sampled_from([I64_MAX, I64_MIN, -1]))))


@budget(1.0)
@given(append_case(), st.data())
def test_append_at_length_fuzz(c, data):
    B, H, D, cap, t, dtype = c["B"], c["H"], c["D"], c["cap"], c["t"], c["dtype"]
    tdt = TORCH_DT[dtype]
    rng = np.random.default_rng(c["seed"])
    faults = Faults()
    shape = [B, H, cap, D]
    init_k = torch.from_numpy(rng.standard_normal(shape)).to(tdt)
    init_v = torch.from_numpy(rng.standard_normal(shape)).to(tdt)
    ks = layout_strides(shape, c["k_layout"])
    vs = ks if c["v_layout"] == "same" else layout_strides(shape, c["v_layout"])
    kg, vg = Guarded(shape, ks, tdt, init_k), Guarded(shape, vs, tdt, init_v)
    k_store, v_store = kg.view, vg.view
    if list(ks) != list(vs):
        faults.add("storage strides differ", soft=True)
    sf = c["store_fault"]
    if sf in ("readonly_k", "readonly_v"):
        ro = readonly_capsule(shape, dtype)
        if sf == "readonly_k":
            k_store = ro.capsule
        else:
            v_store = ro.capsule
        faults.add("read-only storage", (BufferError, ValueError))  # (strides may differ first)
    elif sf == "zero_stride":
        v_store = torch.zeros(1, 1, 1, D, dtype=tdt).expand(shape)
        if B * H * cap > 1 or (B * H * cap == 1 and False):
            faults.add("storage zero strides")
        else:
            faults.add("storage zero strides", soft=True)
    elif sf == "int_dtype":
        k_store = torch.zeros(shape, dtype=torch.int32)
        faults.add("storage int32")
    elif sf == "f64":
        k_store = torch.zeros(shape, dtype=torch.float64)
        faults.add("storage float64")
    elif sf == "v_dtype":
        v_store = torch.zeros(shape, dtype=torch.float32 if dtype != "float32" else torch.float16)
        faults.add("value_storage dtype")
    elif sf == "v_shape":
        v_store = torch.zeros([B, H, cap + 1, D], dtype=tdt)
        faults.add("value_storage shape")
    elif sf in ("junk_k", "junk_v"):
        junk = data.draw(junk_objects())
        if sf == "junk_k":
            k_store = junk
        else:
            v_store = junk
        faults.add("storage junk", (TypeError, ValueError, BufferError, RuntimeError))

    kl, vl = c["src_layouts"]
    k_obj, k64, k_keep = make_input(rng.standard_normal((B, H, t, D)), dtype, kl)
    v_obj, v64, v_keep = make_input(rng.standard_normal((B, H, t, D)), dtype, vl)
    for name, obj, lay in (("keys", k_obj, kl), ("values", v_obj, vl)):
        if must_refuse(obj, lay):
            faults.add(f"{name} {lay}")
    srf = c["src_fault"]
    if srf == "k_tokens":
        k_obj = torch.zeros(B, H, t + 1, D, dtype=tdt)
        faults.add("keys tokens differ from values")
    elif srf == "v_tokens":
        v_obj = torch.zeros(B, H, t + 1, D, dtype=tdt)
        faults.add("values tokens differ from keys")
    elif srf == "k_heads":
        k_obj = torch.zeros(B, H + 1, t, D, dtype=tdt)
        faults.add("keys heads")
    elif srf == "k_dtype":
        k_obj = torch.zeros(B, H, t, D, dtype=torch.float64)
        faults.add("keys float64")
    elif srf == "junk":
        v_obj = data.draw(junk_objects())
        faults.add("values junk", (TypeError, ValueError, BufferError, RuntimeError))

    pos, seen = c["pos"], c["seen"]
    len_obj, lg = make_lengths(data.draw, c["lengths_kind"], pos, seen, faults, written=True, min_len=2)
    note(f"storage {shape} strides k={ks} v={vs} t={t} pos={pos} seen={seen}")

    ran = call_and_classify(_C.append_at_length, faults, k_store, v_store, k_obj, v_obj, len_obj)
    del k_keep, v_keep
    check_guards(kg, vg)
    if lg is not None:
        check_guards(lg)
    if not ran:
        check_untouched(kg, vg)
        if lg is not None:
            check_untouched(lg)
        return
    # The model: write at pos and advance both counters (seen wraps like int64), or change nothing.
    exp_k, exp_v = init_k.double().clone(), init_v.double().clone()
    exp_len = [pos, seen]
    if 0 <= pos and pos + t <= cap:
        exp_k[:, :, pos:pos + t] = torch.from_numpy(k64)
        exp_v[:, :, pos:pos + t] = torch.from_numpy(v64)
        exp_len = [pos + t, i64(seen + t)]
    assert torch.equal(kg.view.double(), exp_k)
    assert torch.equal(vg.view.double(), exp_v)
    if lg is not None:
        assert lg.view.tolist() == exp_len[: lg.view.numel()]


# ------------------------------------------------------------------------------- ring_write

@st.composite
def ring_case(draw):
    W = draw(st.sampled_from([0, 1, 2, 3, 7]))
    case = dict(
        B=draw(st.integers(0, 3)), Hq=draw(st.integers(0, 4)), D=draw(st.sampled_from([0, 1, 2, 5])), W=W,
        t=draw(st.integers(0, W + 1)), dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**31 - 1)),
        ring_kind=draw(st.sampled_from(STORE_LAYOUTS * 3 + ["readonly", "zero_stride", "int_dtype", "junk"])),
        q_layout=draw(st.sampled_from(LAYOUTS)),
        q_fault=draw(st.sampled_from([None] * 8 + ["heads", "dim", "dtype", "junk"])),
        seen=draw(st.one_of(st.integers(-20, 20), st.sampled_from([I64_MAX, I64_MAX - 1, I64_MIN, I64_MIN + 1]))),
        offset=draw(st.one_of(st.integers(-20, 20), st.sampled_from([I64_MAX, I64_MIN, 2**64, "x", None]))),
        lengths_kind=draw(st.sampled_from(LENGTHS_KINDS)),
    )
    return valid_only(draw, case, dict(
        ring_kind=st.sampled_from(STORE_LAYOUTS), q_layout=st.sampled_from(CLEAN_LAYOUTS), q_fault=st.none(),
        t=st.integers(0, max(W, 1)), W=st.just(max(W, 1)), lengths_kind=st.just("good"),
        offset=st.one_of(st.none(), st.integers(-20, 20), st.sampled_from([I64_MAX, I64_MIN]))))


@budget(1.0)
@given(ring_case(), st.data())
def test_ring_write_fuzz(c, data):
    B, Hq, D, W, t, dtype = c["B"], c["Hq"], c["D"], c["W"], c["t"], c["dtype"]
    tdt = TORCH_DT[dtype]
    rng = np.random.default_rng(c["seed"])
    faults = Faults()
    shape = [B, Hq, W, D]
    init = torch.from_numpy(rng.standard_normal(shape)).to(tdt)
    guard = None
    rk = c["ring_kind"]
    if rk in STORE_LAYOUTS:
        guard = Guarded(shape, layout_strides(shape, rk), tdt, init)
        ring = guard.view
    elif rk == "readonly":
        keep = readonly_capsule(shape, dtype)
        ring = keep.capsule
        faults.add("read-only ring", (BufferError, ValueError))
    elif rk == "zero_stride":
        ring = torch.zeros(1, 1, 1, D, dtype=tdt).expand(shape)
        faults.add("ring zero strides", soft=B * Hq * W <= 1)
    elif rk == "int_dtype":
        ring = torch.zeros(shape, dtype=torch.int64)
        faults.add("ring int64")
    else:
        ring = data.draw(junk_objects())
        faults.add("ring junk", (TypeError, ValueError, BufferError, RuntimeError))
    if W == 0:
        faults.add("empty window")
    if t > W:
        faults.add("more tokens than the window")
    q_obj, q64, q_keep = make_input(rng.standard_normal((B, Hq, t, D)), dtype, c["q_layout"])
    if must_refuse(q_obj, c["q_layout"]):
        faults.add(f"q {c['q_layout']}")
    qf = c["q_fault"]
    if qf == "heads":
        q_obj = torch.zeros(B, Hq + 1, t, D, dtype=tdt)
        faults.add("q heads")
    elif qf == "dim":
        q_obj = torch.zeros(B, Hq, t, D + 1, dtype=tdt)
        faults.add("q head_dim")
    elif qf == "dtype":
        q_obj = torch.zeros(B, Hq, t, D, dtype=torch.float64)
        faults.add("q float64")
    elif qf == "junk":
        q_obj = data.draw(junk_objects())
        faults.add("q junk", (TypeError, ValueError, BufferError, RuntimeError))
    seen, offset = c["seen"], c["offset"]
    kwargs = {}
    if offset is not None:
        kwargs["offset"] = offset
        if isinstance(offset, str):
            faults.add("offset str", (TypeError,))
        elif not I64_MIN <= offset <= I64_MAX:
            faults.add("offset beyond int64", (OverflowError,))
    len_obj, lg = make_lengths(data.draw, c["lengths_kind"], 0, seen, faults, written=False, min_len=2)
    note(f"ring {shape} t={t} seen={seen} offset={offset}")

    ran = call_and_classify(_C.ring_write, faults, ring, q_obj, len_obj, **kwargs)
    del q_keep
    if lg is not None:
        check_untouched(lg)
    if guard is None:
        return
    check_guards(guard)
    if not ran:
        check_untouched(guard)
        return
    if faults.soft:
        return
    exp = init.double().clone()
    off = offset if isinstance(offset, int) else 0
    for i in range(t):  # Python's % is the mathematical modulo: no overflow, never negative
        exp[:, :, (seen + off + i) % W] = torch.from_numpy(q64[:, :, i])
    assert torch.equal(guard.view.double(), exp)


# ------------------------------------------------------------------------------- wrong types everywhere

def _good_decode_args():
    q, k = torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 3, 4)
    return [q, k, k.clone(), torch.zeros(1, 2, 1, 4), torch.tensor([2, 2])]


def _good_append_args():
    return [torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2),
            torch.tensor([0, 0])]


def _good_ring_args():
    return [torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 1, 4), torch.tensor([0, 0])]


KW_JUNK = st.sampled_from([object(), "x", 1.5, [], 2**70, -(2**70), b"s", -1, float("nan")])


@budget(0.3)
@given(st.sampled_from(["decode", "append", "ring"]), st.integers(0, 5), junk_objects(),
       st.sampled_from([None, "stream", "splits", "scale", "padding", "offset", "workspace", "bogus"]), KW_JUNK)
def test_wrong_types_raise_cleanly(fn_name, slot, junk, kw, kw_junk):
    fn, args = {"decode": (_C.decode_attention, _good_decode_args()), "append": (_C.append_at_length,
                                                                                 _good_append_args()),
                "ring": (_C.ring_write, _good_ring_args())}[fn_name]
    slot %= len(args) + 1
    if slot < len(args):
        args[slot] = junk
    kwargs = {}
    valid_kw = {"decode": {"stream", "splits", "scale", "padding", "workspace"}, "append": {"stream"},
                "ring": {"stream", "offset"}}[fn_name]
    if kw is not None:
        kwargs[kw] = kw_junk
    try:
        fn(*args, **kwargs)
    except CLEAN_ERRORS as e:
        assert str(e)
        return
    # It ran: only possible when every argument is acceptable as given.
    assert slot == len(args), f"{fn_name} accepted {junk!r} as argument {slot}"
    assert kw is None or kw in valid_kw, f"{fn_name} accepted the keyword {kw}"
    if kw == "stream":  # CPU: only None or a non-negative int handle (ignored) may pass
        assert isinstance(kw_junk, int) and kw_junk >= 0
    if kw in ("splits", "offset"):
        assert isinstance(kw_junk, int) and abs(kw_junk) < 2**63
    if kw == "scale":
        assert isinstance(kw_junk, (int, float)) and math.isfinite(kw_junk)
    if kw == "padding":
        raise AssertionError(f"padding={kw_junk!r} accepted")


def test_positional_only_kw_and_missing_args():
    q, k, v, out, ln = _good_decode_args()
    with pytest.raises(TypeError):
        _C.decode_attention(q, k, v, out, ln, None)  # padding is keyword-only
    with pytest.raises(TypeError):
        _C.decode_attention(q, k, v, out)
    with pytest.raises(TypeError):
        _C.append_at_length(*_good_append_args()[:4])
    with pytest.raises(TypeError):
        _C.ring_write(*_good_ring_args(), 3)  # offset is keyword-only
    with pytest.raises(TypeError):
        _C.decode_workspace_size(1, 2, 1)


# ------------------------------------------------------------------------------- regressions

def test_append_huge_position_is_a_no_op_without_overflow():
    """lengths[0] near INT64_MAX: pos + t overflowed (UB) before the capacity check."""
    ks, vs = torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2)
    ln = torch.tensor([I64_MAX, 0])
    _C.append_at_length(ks, vs, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), ln)
    assert ln.tolist() == [I64_MAX, 0] and torch.count_nonzero(ks) == 0


def test_append_seen_wraps_like_int64():
    ks, vs = torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2)
    ln = torch.tensor([1, I64_MAX])
    _C.append_at_length(ks, vs, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), ln)
    assert ln.tolist() == [3, I64_MIN + 1]


def test_ring_write_huge_seen_and_offset():
    """(lengths[1] + offset) overflowed (UB) for seen near INT64_MAX/MIN; the slot is the math modulo."""
    for seen, offset in ((I64_MAX, 5), (I64_MIN, -5), (I64_MAX, I64_MAX), (I64_MIN, I64_MIN)):
        ring = torch.zeros(1, 1, 7, 1)
        _C.ring_write(ring, torch.ones(1, 1, 1, 1), torch.tensor([0, seen]), offset=offset)
        assert ring.flatten().tolist().index(1.0) == (seen + offset) % 7, (seen, offset)


def test_workspace_size_refuses_products_past_int64():
    with pytest.raises((ValueError, OverflowError)):
        _C.decode_workspace_size(2**24, 2**24, 1, 2**16, 2**40, 65535)


def test_scale_that_is_inf_in_float32_is_refused():
    q, k, v, out, ln = _good_decode_args()
    with pytest.raises(ValueError, match="scale"):
        _C.decode_attention(q, k, v, out, ln, scale=1e300)


def test_decode_huge_zero_stride_capacity():
    """A zero-stride cache of 2**62 slots (no memory behind it): the work estimate B*Hq*D*cap used to
    overflow; only the live length is read."""
    k = torch.zeros(1, 1, 1, 1).expand(1, 1, 2**62, 1)
    out = torch.full((1, 4, 1, 1), math.nan)
    _C.decode_attention(torch.ones(1, 4, 1, 1), k, k, out, torch.tensor([3, 3]))
    assert torch.count_nonzero(out) == 0


def test_decode_empty_batch_with_huge_heads():
    """B = 0 with Hq * D = 2**62 (zero-size tensors): the per-task buffer size overflowed."""
    q = torch.empty(0, 2**31, 1, 2**31)
    k = torch.empty(0, 1, 0, 2**31)
    _C.decode_attention(q, k, k, torch.empty(0, 2**31, 1, 2**31), torch.tensor([0, 0]))


def test_decode_empty_cache_any_head_dim_stride():
    """torch exports stride 0 for every dimension of an empty tensor: an empty cache was refused with
    'keys: expected unit stride along head_dim, got 0'."""
    for B, cap in ((0, 4), (2, 0)):
        out = torch.full((B, 2, 1, 4), math.nan)
        k = torch.zeros(B, 1, cap, 4)
        _C.decode_attention(torch.ones(B, 2, 1, 4), k, k, out, torch.tensor([3, 3]))
        assert torch.count_nonzero(out) == 0


def test_append_zero_sized_rows_still_advance_lengths():
    """Empty rows (head_dim 0) must not reach memcpy (their data pointer may be NULL: UBSan)."""
    ks, vs = torch.zeros(1, 1, 3, 0), torch.zeros(1, 1, 3, 0)
    ln = torch.tensor([1, 1])
    _C.append_at_length(ks, vs, torch.zeros(1, 1, 2, 0), torch.zeros(1, 1, 2, 0), ln)
    assert ln.tolist() == [3, 3]


def test_raw_capsule_whose_element_count_overflows_is_refused_or_empty():
    """A capsule listing sizes whose product overflows int64 is refused with ValueError, unless the
    tensor is empty (a zero size), which is accepted as empty and never read."""
    buf = np.zeros(4, np.float32)
    huge = 2**40
    c = RawCapsule(buf, buf.ctypes.data, 0, [huge, 1, huge], None, 2, 32)
    with pytest.raises(ValueError, match="overflows"):
        _C.select(c.capsule, 1)
    e = RawCapsule(buf, buf.ctypes.data, 0, [0, huge, 1, huge], None, 2, 32)
    with pytest.raises((ValueError, TypeError)):  # empty but the wrong rank for select: refused, no crash
        _C.select(e.capsule, 1)
