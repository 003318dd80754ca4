"""Property-based fuzzing of the selection-policy entry points of rpc_py._C (hypothesis), on the CPU:
attn_scores, redundancy, fill_scores, _accumulate, and the KVCache methods accumulate / accumulator /
compact / ring_position in a state machine.

Contract (docs/design.md, "Errors"): every call either works and agrees with an independent model
(rpc_py.policy_reference, compact_reference, NumPy bookkeeping) or raises one of the documented
exception kinds naming the argument; it never crashes and never corrupts memory. ci/sanitize.sh runs
this file under ASan + UBSan. Inputs reuse tests/test_fuzz.py's layouts (offsets, permutations, zero and
negative strides, overlap, misaligned data, raw capsules) and junk objects.

Profiles as in tests/test_fuzz.py: "ci" (default, bounded, derandomized) and "long"
(RPC_PY_FUZZ_PROFILE=long python -m pytest tests/test_fuzz_policy.py).
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

from rpc_py import KVCache, _C  # noqa: E402
from rpc_py import policy_reference as P  # noqa: E402
from rpc_py.reference import compact_reference  # noqa: E402
from test_fuzz import (  # noqa: E402
    CLEAN_ERRORS,
    DTYPES,
    LAYOUTS,
    SETTINGS,
    TORCH_DT,
    expect_clean,
    junk_objects,
    make_input,
    must_refuse,
    view64,
)
from test_policy_kernels import threshold_margin  # noqa: E402

NORMS = ["candidates", "past", "causal"]
GQAS = ["mean_probs", "max_logits"]


def close(got, want, rtol=2e-4, atol=2e-6):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=rtol,
                               atol=atol, equal_nan=True)


def container(draw, vals):
    """vals as a list, tuple, or int64 NumPy array / torch tensor (all accepted forms)."""
    kind = draw(st.sampled_from(["list", "tuple", "numpy", "torch"]))
    if kind == "tuple":
        return vals, tuple(vals)
    if kind == "numpy":
        return vals, np.array(vals, dtype=np.int64)
    if kind == "torch":
        return vals, torch.tensor(vals, dtype=torch.int64)
    return vals, list(vals)


# ------------------------------------------------------------------------------------- attn_scores


@st.composite
def attn_case(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    R = draw(st.integers(1, 5))
    D = draw(st.sampled_from([1, 2, 3, 8, 16, 33]))
    L = draw(st.integers(1, 40))
    start = draw(st.integers(0, L - 1))
    end = draw(st.integers(start + 1, L))
    pad_vals, pad = None, None
    if draw(st.booleans()):
        pad_vals, pad = container(draw, draw(st.lists(st.integers(0, L + 2), min_size=B, max_size=B)))
    far = st.sampled_from([-(2**40), 2**40, -1])
    qpos_vals, qpos = container(draw, draw(st.lists(st.one_of(st.integers(-2, L + 2), far), min_size=R, max_size=R)))
    opts = dict(norm=draw(st.sampled_from(NORMS)), gqa=draw(st.sampled_from(GQAS)),
                query_reduce=draw(st.sampled_from(["sum", "mean"])), aggregation=draw(st.sampled_from(["all", "group"])),
                pooling=draw(st.sampled_from(["avg", "max"])), kernel_size=draw(st.sampled_from([1, 3, 5, 63])))
    if draw(st.booleans()):  # how the window's queries are weighted (default: every query 1)
        w = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=R, max_size=R))
        kind = draw(st.sampled_from(["list", "tuple", "numpy", "torch"]))
        opts["query_weights"] = (w if kind == "list" else tuple(w) if kind == "tuple" else
                                 np.array(w, dtype=np.float32) if kind == "numpy" else torch.tensor(w))
    dtype = draw(st.sampled_from(DTYPES))
    lays = (draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS)))
    scalar = draw(st.booleans())
    return B, Hkv, G, R, D, L, start, end, pad_vals, pad, qpos_vals, qpos, opts, dtype, lays, scalar, \
        draw(st.integers(0, 2**31 - 1))


@settings(**SETTINGS)
@given(attn_case())
def test_attn_scores_matches_oracle(case):
    B, Hkv, G, R, D, L, start, end, pad_vals, pad, qpos_vals, qpos, opts, dtype, (qlay, klay), scalar, seed = case
    rng = np.random.default_rng(seed)
    q, q_exp, q_keep = make_input(rng.standard_normal((B, Hkv * G, R, D)) * 2, dtype, qlay)
    k, k_exp, k_keep = make_input(rng.standard_normal((B, Hkv, L, D)) * 2, dtype, klay)
    fn = _C._attn_scores_scalar if scalar else _C.attn_scores
    ok, res = expect_clean(fn, q, k, start, end, query_positions=qpos, padding=pad, raw=True, **opts)
    if must_refuse(q, qlay) or must_refuse(k, klay):
        assert not ok and isinstance(res, ValueError), res
        return
    assert ok, f"attn_scores refused valid input ({qlay}, {klay}): {res!r}"
    event(f"attn_scores ran ({opts['norm']}, {opts['gqa']})")
    if "query_weights" in opts:
        opts = dict(opts, query_weights=[float(x) for x in opts["query_weights"]])
    ref, ref_raw = P.window_attention_reference(torch.from_numpy(q_exp), torch.from_numpy(k_exp), start, end,
                                                query_positions=qpos_vals, padding=pad_vals, **opts)
    close(res[0], ref.numpy())
    close(res[1], ref_raw.numpy())
    del q_keep, k_keep


@settings(**SETTINGS)
@given(st.integers(-3, 45), st.integers(-3, 45), st.sampled_from([-1, 0, 1, 2, 3, 7, 2**31 - 1]),
       st.sampled_from(NORMS + ["", "full"]), st.sampled_from(GQAS + ["mean"]), st.sampled_from(["sum", "mean", "max"]),
       st.sampled_from([(2, 1), (3, 2), (0, 1)]), st.sampled_from([(1, 4), (0, 4), (2, 4)]),
       st.sampled_from([None, [0], [0, 0], [-1], [2**63 - 1], "x"]), st.sampled_from([None, 1, 2, "bad"]))
def test_attn_scores_bad_arguments_raise(start, end, ks, norm, gqa, reduce, heads, rd, padding, qpos_len):
    Hq, Hkv = heads
    R, D = rd
    q = np.ones((1, Hq, R, D), np.float32)
    k = np.ones((1, Hkv, 40, 4), np.float32)
    qpos = None if qpos_len is None else ("bad" if qpos_len == "bad" else list(range(qpos_len)))
    ok, res = expect_clean(_C.attn_scores, q, k, start, end, kernel_size=ks, norm=norm, gqa=gqa, query_reduce=reduce,
                           padding=padding, query_positions=qpos)
    valid = (0 <= start < end <= 40 and ks >= 1 and ks % 2 == 1 and norm in NORMS and gqa in GQAS
             and reduce in ("sum", "mean") and Hkv >= 1 and Hq >= 1 and Hq % Hkv == 0 and R >= 1 and D == 4
             and (padding is None or (isinstance(padding, list) and len(padding) == 1 and padding[0] >= 0))
             and (qpos_len is None and norm != "causal" or qpos_len == R))
    assert ok == valid, res
    if ok:
        assert np.all(np.isfinite(res)) and np.asarray(res).shape[2] == end - start


@settings(**SETTINGS)
@given(junk_objects(), st.sampled_from(["queries", "keys", "query_positions", "padding"]))
def test_attn_scores_wrong_types_raise(junk, which):
    args = dict(queries=np.ones((1, 2, 2, 4), np.float32), keys=np.ones((1, 1, 5, 4), np.float32),
                query_positions=[3, 4], padding=[0])
    args[which] = junk
    ok, res = expect_clean(_C.attn_scores, args["queries"], args["keys"], 0, 5, norm="causal",
                           query_positions=args["query_positions"], padding=args["padding"])
    if (which == "padding" and junk is None) or (which == "query_positions" and isinstance(junk, tuple) and junk == (1, 2)):
        assert ok, res  # None is "no padding"; (1, 2) is a valid pair of positions
        return
    assert not ok, f"attn_scores accepted {junk!r} as {which}"


# -------------------------------------------------------------------------------------- redundancy


@st.composite
def redundancy_case(draw):
    B = draw(st.integers(0, 3))
    Hkv = draw(st.integers(0, 3))
    L = draw(st.integers(0, 40))
    D = draw(st.sampled_from([1, 2, 3, 8, 16, 33]))
    pad = draw(st.one_of(st.none(), st.lists(st.integers(0, L + 3), min_size=B, max_size=B)))
    threshold = draw(st.sampled_from([0.5, 0.25, -0.5, 2.0, -2.0, math.inf, -math.inf]))
    special = draw(st.sampled_from([None, None, None, "nan", "inf"]))
    return B, Hkv, L, D, pad, threshold, special, draw(st.sampled_from(DTYPES)), draw(st.sampled_from(LAYOUTS)), \
        draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(**SETTINGS)
@given(redundancy_case())
def test_redundancy_matches_oracle(case):
    B, Hkv, L, D, pad, threshold, special, dtype, lay, scalar, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, Hkv, L, D)) * 2
    if special and x.size:
        x.reshape(-1)[rng.integers(0, x.size)] = np.nan if special == "nan" else np.inf
    k, k_exp, keep = make_input(x, dtype, lay)
    fn = _C._redundancy_scalar if scalar else _C.redundancy
    ok, res = expect_clean(fn, k, padding=pad, threshold=threshold)
    if must_refuse(k, lay):
        assert not ok and isinstance(res, ValueError), res
        return
    assert ok, f"redundancy refused valid input ({lay}): {res!r}"
    got = np.asarray(res)
    assert got.shape == (B, Hkv, L) and got.dtype == np.float32
    kt = torch.from_numpy(k_exp)
    pads = pad if pad is not None else [0] * B
    if B and Hkv and L and threshold_margin(kt, [min(p, L) for p in pads], threshold) < 1e-5:
        event("redundancy: similarity at the threshold (result not pinned)")
        return
    close(got, P.redundancy_reference(kt, padding=pad, threshold=threshold).numpy())
    del keep


# ------------------------------------------------------------------------------------- fill_scores


@settings(**SETTINGS)
@given(st.sampled_from(["recent", "random", "random", "", "Random"]), st.integers(-1, 4), st.integers(-1, 4),
       st.integers(-1, 50), st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([1.5, "s", None, True])),
       st.integers(-(2**66), 2**66), st.integers(0, 2**64), st.sampled_from(["cpu", "cpu", "cuda:99", "gpu", 3]))
def test_fill_scores_matches_oracle_or_refuses(kind, batch, rows, n, seed, layer, compression, device):
    kw = dict(layer=layer, compression=compression, device=device)
    if seed is not None:
        kw["seed"] = seed
    ok, res = expect_clean(_C.fill_scores, kind, batch, rows, n, **kw)
    seed_ok = seed is None or (isinstance(seed, int) and not isinstance(seed, bool))
    valid = kind in ("recent", "random") and min(batch, rows, n) >= 0 and seed_ok and device == "cpu"
    assert ok == valid, res
    if not ok:
        return
    s = 0 if seed is None else seed
    want = (P.recent_scores_reference(batch, rows, n) if kind == "recent"
            else P.random_scores_reference(batch, rows, n, seed=s, layer=layer, compression=compression))
    np.testing.assert_array_equal(np.asarray(res, dtype=np.float64), want.numpy())


# ------------------------------------------------------------------------------------- _accumulate


@st.composite
def accumulate_case(draw):
    B = draw(st.integers(0, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 2, 3, 8, 16, 33]))
    L = draw(st.integers(0, 40))
    pad = draw(st.one_of(st.none(), st.lists(st.integers(0, L + 3), min_size=B, max_size=B)))
    acc_lay = draw(st.sampled_from(["contig", "offset", "permuted", "numpy"]))
    return B, Hkv, G, D, L, pad, draw(st.sampled_from(DTYPES)), draw(st.sampled_from(LAYOUTS)), \
        draw(st.sampled_from(LAYOUTS)), acc_lay, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(**SETTINGS)
@given(accumulate_case())
def test_accumulate_matches_oracle(case):
    B, Hkv, G, D, L, pad, dtype, qlay, klay, acc_lay, reference, seed = case
    rng = np.random.default_rng(seed)
    q, q_exp, qk = make_input(rng.standard_normal((B, Hkv * G, 1, D)) * 2, dtype, qlay)
    k, k_exp, kk = make_input(rng.standard_normal((B, Hkv, L, D)) * 2, dtype, klay)
    a0 = rng.random((B, Hkv, L)).astype(np.float32)
    if acc_lay == "numpy":
        acc = a0.copy()
    elif acc_lay == "offset":
        big = torch.zeros(B, Hkv, L + 3)
        big[:, :, 2:2 + L] = torch.from_numpy(a0)
        acc = big[:, :, 2:2 + L]
    elif acc_lay == "permuted":
        acc = torch.from_numpy(a0.copy()).permute(2, 0, 1).contiguous().permute(1, 2, 0)
    else:
        acc = torch.from_numpy(a0.copy())
    ok, res = expect_clean(_C._accumulate, q, k, acc, padding=pad, reference=reference)
    if must_refuse(q, qlay) or must_refuse(k, klay):
        assert not ok and isinstance(res, ValueError), res
        np.testing.assert_array_equal(np.asarray(acc), a0)  # untouched
        return
    assert ok, f"_accumulate refused valid input ({qlay}, {klay}, {acc_lay}): {res!r}"
    want = P.h2o_accumulate_reference(torch.from_numpy(a0), torch.from_numpy(q_exp), torch.from_numpy(k_exp),
                                      padding=pad)
    close(np.asarray(acc), want.numpy(), rtol=2e-5, atol=2e-6)
    del qk, kk


# ------------------------------------------------------------------------------------ state machine


class PolicyCacheMachine(RuleBasedStateMachine):
    """KVCache with accumulators under random appends, decode steps (append + record_query + accumulate),
    compactions with chosen (sometimes corrupt) indices, RPC compressions, padding changes, growth,
    resets and close, checked against a NumPy model after every step."""

    @initialize(L=st.integers(1, 2), B=st.integers(1, 2), H=st.integers(1, 2), G=st.integers(1, 3),
                D=st.sampled_from([2, 4, 8]), dtype=st.sampled_from(DTYPES), window=st.sampled_from([0, 1, 2, 3]),
                capacity=st.sampled_from([0, 0, 3, 40]), seed=st.integers(0, 2**31 - 1), prefill=st.integers(0, 12))
    def init(self, L, B, H, G, D, dtype, window, capacity, seed, prefill):
        self.cache = KVCache(L, B, H, D, dtype, capacity=capacity, window=window, accumulators=True)
        self.L, self.B, self.H, self.G, self.D, self.dtype, self.W = L, B, H, G, D, dtype, window
        self.rng = np.random.default_rng(seed)
        self.keys = [np.zeros((B, H, 0, D)) for _ in range(L)]
        self.values = [np.zeros((B, H, 0, D)) for _ in range(L)]
        self.acc = [np.zeros((B, H, 0)) for _ in range(L)]
        self.recorded = [0] * L
        self.ring_pos = [0] * L
        self.placed = [False] * L
        self.padding = [0] * B
        self.closed = False
        self.append(0, prefill)

    layer = st.integers(0, 1)

    def _tensor(self, shape, lay="contig"):
        return make_input(self.rng.standard_normal(shape), self.dtype, lay)

    @rule(layer=layer, t=st.integers(0, 6), lay=st.sampled_from(["contig", "offset", "permuted", "zero_stride"]))
    def append(self, layer, t, lay="contig"):
        layer %= self.L
        k, ke, _ = self._tensor((self.B, self.H, t, self.D), lay)
        v, ve, _ = self._tensor((self.B, self.H, t, self.D))
        if self.closed:
            with pytest.raises(ValueError, match="closed"):
                self.cache.append(layer, k, v)
            return
        assert self.cache.append(layer, k, v) == self.keys[layer].shape[2] + t
        self.placed[layer] = True
        self.keys[layer] = np.concatenate([self.keys[layer], ke], 2)
        self.values[layer] = np.concatenate([self.values[layer], ve], 2)
        self.acc[layer] = np.concatenate([self.acc[layer], np.zeros((self.B, self.H, t))], 2)

    def _record(self, layer, q, qe):
        t = qe.shape[2]
        assert self.cache.record_query(layer, q) == min(self.recorded[layer] + t, self.W)
        self.recorded[layer] += t
        self.ring_pos[layer] = 0 if t >= self.W else (self.ring_pos[layer] + t) % self.W

    @rule(layer=layer, steps=st.integers(1, 3), bad=st.sampled_from([None] * 6 + ["heads", "tokens", "dtype", "junk"]))
    def decode(self, layer, steps, bad):
        """One token, its query recorded and accumulated: what the H2O policy does every step."""
        layer %= self.L
        for _ in range(steps):
            self.append(layer, 1)
            if self.closed:
                return
            q, qe, _ = self._tensor((self.B, self.H * self.G, 1, self.D), "permuted")
            if self.W > 0:
                self._record(layer, q, qe)
            if bad is not None:
                bad_q = {"heads": lambda: torch.zeros(self.B, 0, 1, self.D, dtype=TORCH_DT[self.dtype]),
                         "tokens": lambda: torch.zeros(self.B, self.H * self.G, 2, self.D, dtype=TORCH_DT[self.dtype]),
                         "dtype": lambda: torch.zeros(self.B, self.H * self.G, 1, self.D, dtype=torch.float64),
                         "junk": lambda: "q"}[bad]()
                ok, res = expect_clean(self.cache.accumulate, layer, bad_q)
                assert not ok, f"accumulate accepted a bad query ({bad})"
                continue
            self.cache.accumulate(layer, q)
            want = P.h2o_accumulate_reference(torch.from_numpy(self.acc[layer]), torch.from_numpy(qe),
                                              torch.from_numpy(self.keys[layer]), padding=self.padding)
            self.acc[layer] = want.float().double().numpy()

    @rule(layer=layer, start_frac=st.floats(0, 1), keep_frac=st.floats(0, 1), per_head=st.booleans(),
          corrupt=st.sampled_from([None] * 5 + ["dup", "desc", "neg", "big", "dtype", "shape", "start", "keep"]))
    def compact(self, layer, start_frac, keep_frac, per_head, corrupt):
        layer %= self.L
        Lnow = self.keys[layer].shape[2]
        end = Lnow - self.W
        start = int(start_frac * max(end, 0))
        N = end - start
        A = self.H if per_head else 1
        keep = int(keep_frac * max(N, 0))
        idx = np.zeros((self.B, A, keep), np.int64)
        if N > 0:
            idx = np.stack([np.sort(self.rng.choice(N, keep, replace=False)) for _ in range(self.B * A)])
            idx = idx.astype(np.int64).reshape(self.B, A, keep)
        bad = idx.copy()
        s = start
        if corrupt == "dup" and keep >= 2:
            bad[..., 1] = bad[..., 0]
        elif corrupt == "desc" and keep >= 2 and not np.array_equal(bad, bad[..., ::-1]):
            bad = bad[..., ::-1].copy()
        elif corrupt == "neg" and keep >= 1:
            bad[..., 0] = -1
        elif corrupt == "big" and keep >= 1:
            bad[..., -1] = N
        elif corrupt == "dtype":
            bad = bad.astype(np.int32)
        elif corrupt == "shape":
            bad = bad.reshape(self.B, A, keep, 1)
        elif corrupt == "start":
            s = end + 1
        elif corrupt == "keep":
            bad = np.zeros((self.B, A, max(N, 0) + 1), np.int64)
        else:
            corrupt = None
        if self.closed:
            with pytest.raises(ValueError, match="closed"):
                self.cache.compact(layer, s, bad)
            return
        ok, res = expect_clean(self.cache.compact, layer, s, bad)
        if not self.placed[layer] or end < 0 or corrupt is not None:
            assert not ok and isinstance(res, (ValueError, TypeError)), res
            event("compact refused")
            return
        assert ok, res
        event("compact ran")
        k, v = compact_reference(torch.from_numpy(self.keys[layer]), torch.from_numpy(self.values[layer]),
                                 torch.from_numpy(idx), start, end)
        a3, _ = compact_reference(torch.from_numpy(self.acc[layer])[..., None],
                                  torch.from_numpy(self.acc[layer])[..., None], torch.from_numpy(idx), start, end)
        self.keys[layer], self.values[layer], self.acc[layer] = k.numpy(), v.numpy(), a3[..., 0].numpy()
        assert res == k.shape[2]

    @rule(layer=layer, start_frac=st.floats(0, 1), keep_frac=st.floats(0, 1), agg=st.sampled_from(["all", "group"]))
    def compress(self, layer, start_frac, keep_frac, agg):
        layer %= self.L
        Lnow = self.keys[layer].shape[2]
        end = Lnow - self.W
        if self.closed or self.W == 0 or min(self.recorded[layer], self.W) < self.W or end < 1:
            return
        start = int(start_frac * (end - 1))
        keep = int(keep_frac * (end - start))
        n, _, idx = self.cache.compress(layer, start, keep, aggregation=agg, return_details=True)
        idx = torch.from_numpy(np.asarray(idx))
        k, v = compact_reference(torch.from_numpy(self.keys[layer]), torch.from_numpy(self.values[layer]), idx, start,
                                 end)
        a3, _ = compact_reference(torch.from_numpy(self.acc[layer])[..., None],
                                  torch.from_numpy(self.acc[layer])[..., None], idx, start, end)
        self.keys[layer], self.values[layer], self.acc[layer] = k.numpy(), v.numpy(), a3[..., 0].numpy()
        assert n == k.shape[2]
        event("compress ran")

    @rule(counts=st.lists(st.integers(0, 20), min_size=1, max_size=2))
    def set_padding(self, counts):
        if self.closed:
            return
        ok, res = expect_clean(self.cache.set_padding, counts)
        assert ok == (len(counts) == self.B), res
        if ok:
            self.padding = list(counts)

    @rule(layer=layer, extra=st.integers(0, 300))
    def grow(self, layer, extra):
        layer %= self.L
        if self.closed:
            return
        cap = self.cache.capacity(layer)
        assert self.cache.allocate(layer, "cpu", 0, cap + extra) >= cap + extra
        self.placed[layer] = True

    @rule(then_close=st.sampled_from([False] * 5 + [True]))
    def reset(self, then_close):
        if self.closed:
            return
        if then_close:
            self.cache.close()
            self.closed = True
            gc.collect()
            return
        self.cache.reset()
        for i in range(self.L):
            self.keys[i] = self.keys[i][:, :, :0]
            self.values[i] = self.values[i][:, :, :0]
            self.acc[i] = self.acc[i][:, :, :0]
            self.recorded[i] = 0
            self.ring_pos[i] = 0
        self.padding = [0] * self.B

    @invariant()
    def agrees_with_model(self):
        if not hasattr(self, "cache") or self.closed:
            return
        c = self.cache
        for i in range(self.L):
            n = self.keys[i].shape[2]
            assert c.length(i) == n
            assert c.ring_position(i) == self.ring_pos[i]
            acc = view64(c.accumulator(i))
            assert acc.shape == (self.B, self.H, n)
            if n:
                np.testing.assert_array_equal(view64(c.keys(i)), self.keys[i])
                np.testing.assert_array_equal(view64(c.values(i)), self.values[i])
                # (the model appends zeros, so this also checks that vacated capacity was zeroed)
                np.testing.assert_allclose(acc, self.acc[i], rtol=2e-5, atol=2e-5)

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()


PolicyCacheMachine.TestCase.settings = settings(settings.default, **SETTINGS)
TestPolicyCacheMachine = PolicyCacheMachine.TestCase
