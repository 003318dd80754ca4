"""Self-check of rpc_py's kernels on a device before they touch a user's tokens.

rpc_py's CUDA kernels are built for GPUs we may never have run them on. The first time a process
uses a kernel family on a CUDA device, ``ensure`` runs it on a small random case (milliseconds) and
compares the result with rpc_py's CPU kernels on the same inputs. A mismatch raises
``KernelCheckError`` naming the kernel, the device and the way out: the pure-torch kernels
(``rpc_py.set_kernels("torch")`` or ``RPC_PY_KERNELS=torch``, see ``rpc_py.kernel_choice``), so a wrong
kernel never silently changes which tokens are kept or what attention returns.

The same checks run on demand for any device and either implementation::

    python -m rpc_py.selfcheck                      # every family on every CUDA device (native)
    python -m rpc_py.selfcheck --device cpu --impl torch --json out.json

``impl="torch"`` checks ``rpc_py.torch_kernels`` against the CPU kernels instead, which is how the
test suite exercises every check on a machine without a GPU. ``RPC_PY_SELFCHECK=0`` skips the
automatic checks (benchmarks that time the first call, or a device already checked elsewhere).

Families (what each compares):
  copy        KVCache.append with growth, record_query                          exact
  score       RPC scores (_C.score, both CUDA kernel versions where they apply)  tolerance
  select      top-k selection with ties, NaN and infinities                     exact
  compact     in-place compaction of K and V                                    exact
  compress    KVCache.compress (fused score + select + compact) and its details exact where the
                                                                                scores leave a margin
  decode      decode_attention, append_at_length, ring_write (CUDA-graph path)  tolerance / exact
  attn_scores the policies' window attention (every norm and GQA mode)          tolerance
  redundancy  R-KV's key redundancy                                             tolerance
  fill        recent / random fills                                             exact
  accumulate  H2O's accumulation and the accumulator's compaction               tolerance / exact
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time

import torch

__all__ = ["FAMILIES", "CheckResult", "KernelCheckError", "check", "ensure", "passed", "report"]

FAMILIES = ("copy", "score", "select", "compact", "compress", "decode", "attn_scores", "redundancy", "fill",
            "accumulate")
# What the torch path implements (the decode kernels belong to the CUDA-graph loop, which the torch
# path does not use; its compression is score + select + compact, checked one by one).
TORCH_FAMILIES = ("copy", "score", "select", "compact", "attn_scores", "redundancy", "fill", "accumulate")

# Relative tolerance on float results (of the largest magnitude in the CPU result), per input dtype.
# The kernels compute in float32 from the same (rounded) inputs, so they agree far closer than this;
# a wrong kernel misses by orders of magnitude.
_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}
# decode_attention returns the input dtype: one rounding of the output on top.
_RTOL_OUT = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


class KernelCheckError(RuntimeError):
    """A kernel of rpc_py gave wrong results on this device; it is not used."""


@dataclasses.dataclass
class CheckResult:
    family: str
    device: str
    impl: str  # "native" or "torch"
    dtype: str
    ok: bool
    max_error: float  # largest deviation found (0.0 for exact comparisons that matched)
    tolerance: float
    detail: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_lock = threading.Lock()
_checked: dict = {}  # (family, device, dtype, head_dim) -> CheckResult, once per process


def _enabled() -> bool:
    return os.environ.get("RPC_PY_SELFCHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    try:
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, compute capability {props.major}.{props.minor})"
    except Exception:  # noqa: BLE001 - a name for a message; never the reason to fail
        return str(device)


def ensure(device, families, *, dtype=torch.float32, head_dim: int = 64) -> None:
    """Check each of ``families`` once per process on ``device`` (a CUDA device; nothing to do on the
    CPU, whose kernels the checks compare against) with rpc_py's own kernels; raise
    ``KernelCheckError`` on the first family that fails. Cached: a later call costs a dict lookup."""
    device = torch.device(device)
    if device.type != "cuda" or not _enabled():
        return
    for family in families:
        key = (family, str(device), str(dtype), int(head_dim))
        with _lock:
            result = _checked.get(key)
        if result is None:
            result = check(device, [family], dtype=dtype, head_dim=head_dim)[0]
            with _lock:
                _checked[key] = result
        if not result.ok:
            raise KernelCheckError(_failure_message(result, device))


def _failure_message(r: CheckResult, device: torch.device) -> str:
    return (
        f"rpc_py's CUDA kernels '{r.family}' gave wrong results on {_device_name(device)}: {r.detail} "
        f"(max error {r.max_error:.3g}, tolerance {r.tolerance:.3g}; {r.dtype} inputs, against rpc_py's CPU "
        "kernels on a small random case). rpc_py will not run them on this device. To run there anyway, "
        "switch to the pure-torch kernels (float32 torch operations, slower): rpc_py.set_kernels('torch') or "
        "RPC_PY_KERNELS=torch in the environment. Please report this with the output of "
        "`python -m rpc_py.selfcheck`."
    )


def passed(results) -> bool:
    return all(r.ok for r in results)


def report(results) -> str:
    """A small table of check results."""
    rows = [("family", "device", "impl", "dtype", "result", "max error", "tolerance", "ms")]
    for r in results:
        rows.append((r.family, r.device, r.impl, r.dtype, "ok" if r.ok else "FAILED", f"{r.max_error:.2e}",
                     f"{r.tolerance:.1e}", f"{1e3 * r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        if not r.ok:
            lines.append(f"{r.family} on {r.device}: {r.detail}")
    return "\n".join(lines)


def check(device, families=None, *, dtype=torch.float32, head_dim: int = 64, impl: str = "native",
          seed: int = 0) -> list[CheckResult]:
    """Run the checks of ``families`` (default: all the implementation has) on ``device``; returns one
    ``CheckResult`` per family, never raises for a mismatch (an unexpected exception inside a kernel
    counts as a failure and is described in ``detail``)."""
    device = torch.device(device)
    if impl not in ("native", "torch"):
        raise ValueError(f"impl: expected 'native' or 'torch', got {impl!r}")
    available = FAMILIES if impl == "native" else TORCH_FAMILIES
    families = list(available if families is None else families)
    for f in families:
        if f not in available:
            raise ValueError(f"families: {f!r} is not a {impl} kernel family; expected one of {available}")
    if dtype not in _RTOL:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    results = []
    for family in families:
        t0 = time.perf_counter()
        ctx = _Ctx(device, impl, dtype, int(head_dim), seed)
        try:
            ok, err, tol, detail = _CHECKS[family](ctx)
        except Exception as exc:  # noqa: BLE001 - a crashing kernel is a failed check, reported as such
            ok, err, tol, detail = False, math.inf, 0.0, f"raised {type(exc).__name__}: {exc}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results.append(CheckResult(family, str(device), impl, str(dtype).replace("torch.", ""), bool(ok), float(err),
                                   float(tol), detail, time.perf_counter() - t0))
    return results


# ------------------------------------------------------------------------------------------ the cases


@dataclasses.dataclass
class _Ctx:
    device: torch.device
    impl: str
    dtype: torch.dtype
    D: int
    seed: int

    def gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(1_000_003 * self.seed + salt)

    def randn(self, *shape, salt: int, scale: float = 1.0, dtype=None) -> torch.Tensor:
        """On the CPU, rounded to the check's dtype (the same values go to both implementations)."""
        return (scale * torch.randn(*shape, generator=self.gen(salt))).to(dtype or self.dtype)

    def dev(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)

    @property
    def native(self) -> bool:
        return self.impl == "native"

    @property
    def stream(self):
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None


def _rel_error(got: torch.Tensor, want: torch.Tensor):
    """(max |got - want| / max(|want|, tiny), whether NaN/inf positions agree)."""
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        return math.inf, False
    same_special = bool(torch.equal(torch.isnan(got), torch.isnan(want))) and bool(
        torch.equal(torch.isinf(got) & (got > 0), torch.isinf(want) & (want > 0)))
    finite = torch.isfinite(got) & torch.isfinite(want)
    if not bool(finite.any()):
        return 0.0, same_special
    scale = max(float(want[finite].abs().max()), 1e-30)
    return float((got[finite] - want[finite]).abs().max()) / scale, same_special


def _close(got, want, rtol, what):
    err, special_ok = _rel_error(got, want)
    if not special_ok:
        return False, math.inf, rtol, f"{what}: NaN/inf in different places than the CPU kernel"
    return err <= rtol, err, rtol, (f"{what}: relative error {err:.3g}" if err > rtol else "")


def _exact(got, want, what):
    got = got.detach().cpu()
    want = want.detach().cpu()
    if got.shape != want.shape:
        return False, math.inf, 0.0, f"{what}: shape {list(got.shape)}, expected {list(want.shape)}"
    same = torch.equal(got, want) if not got.dtype.is_floating_point else bool(
        ((got == want) | (torch.isnan(got) & torch.isnan(want))).all())
    if same:
        return True, 0.0, 0.0, ""
    diff = (got != want)
    if got.dtype.is_floating_point:
        diff &= ~(torch.isnan(got) & torch.isnan(want))
    return False, float(diff.sum()), 0.0, f"{what}: {int(diff.sum())} of {diff.numel()} entries differ"


def _combine(*parts):
    ok = all(p[0] for p in parts)
    err = max(p[1] for p in parts)
    tol = max(p[2] for p in parts)
    detail = "; ".join(p[3] for p in parts if p[3])
    return ok, err, tol, detail


def _kv_cache(ctx, *, B, H, Hq, W, capacity=0, accumulators=False):
    """A one-layer KVCache in the check's dtype; its device is set by the first append."""
    from . import _C

    kw = {"accumulators": True} if accumulators else {}
    kv = _C.KVCache(1, B, H, ctx.D, str(ctx.dtype).replace("torch.", ""), capacity=capacity, window=W, q_heads=Hq,
                    **kw)
    return kv


def _check_copy(ctx):
    from . import torch_kernels as tk

    B, H, Hq, W = 2, 3, 6, 4
    chunks = [(ctx.randn(B, H, t, ctx.D, salt=10 + t), ctx.randn(B, H, t, ctx.D, salt=20 + t)) for t in (5, 300, 1)]
    queries = [ctx.randn(B, Hq, 1, ctx.D, salt=40 + i) for i in range(W + 2)]
    keys = torch.cat([k for k, _ in chunks], dim=2)
    values = torch.cat([v for _, v in chunks], dim=2)
    if ctx.native:
        kv = _kv_cache(ctx, B=B, H=H, Hq=Hq, W=W)  # grows from 256: the 300-token chunk moves it
        for k, v in chunks:
            kv.append(0, ctx.dev(k), ctx.dev(v), stream=ctx.stream)
        for q in queries:
            kv.record_query(0, ctx.dev(q), stream=ctx.stream)
        got_k = torch.from_dlpack(kv.keys(0)).cpu()
        got_v = torch.from_dlpack(kv.values(0)).cpu()
        ring = torch.from_dlpack(kv.queries(0)).cpu()
        head = kv.ring_position(0)
        kv.close()
    else:
        cap = 320
        sk = torch.zeros(B, H, cap, ctx.D, dtype=ctx.dtype, device=ctx.device)
        sv = torch.zeros_like(sk)
        length = 0
        for k, v in chunks:
            length = tk.append_(sk, sv, ctx.dev(k), ctx.dev(v), length)
        got_k, got_v = sk[:, :, :length].cpu(), sv[:, :, :length].cpu()
        ring_t = torch.zeros(B, Hq, W, ctx.D, dtype=ctx.dtype, device=ctx.device)
        for i, q in enumerate(queries):
            tk.ring_write_(ring_t, ctx.dev(q), i % W)
        ring, head = ring_t.cpu(), len(queries) % W
    want_ring = torch.zeros(B, Hq, W, ctx.D, dtype=ctx.dtype)
    for i, q in enumerate(queries):
        want_ring[:, :, i % W] = q[:, :, 0]
    return _combine(_exact(got_k, keys, "keys after append"), _exact(got_v, values, "values after append"),
                    _exact(ring, want_ring, "query ring"),
                    (head == len(queries) % W, 0.0, 0.0, "" if head == len(queries) % W else "ring position"))


def _score_case(ctx, salt=0):
    B, Hkv, G, R, L = 2, 2, 3, 5, 150
    q = ctx.randn(B, Hkv * G, R, ctx.D, salt=100 + salt)
    k = ctx.randn(B, Hkv, L, ctx.D, salt=101 + salt, scale=1.5)
    return q, k, 7, L - R


def _check_score(ctx):
    from . import _C
    from . import torch_kernels as tk

    q, k, start, end = _score_case(ctx)
    parts = []
    for agg, pool, ks in (("all", "avg", 7), ("group", "max", 5), ("all", "max", 1)):
        want = torch.as_tensor(_C.score(q, k, start, end, aggregation=agg, pooling=pool, kernel_size=ks))
        if ctx.native:
            versions = (0, 1) if ctx.dtype != torch.float32 else (0,)
            for version in versions:
                got = torch.from_dlpack(_C.score(ctx.dev(q), ctx.dev(k), start, end, aggregation=agg, pooling=pool,
                                                 kernel_size=ks, stream=ctx.stream, version=version))
                parts.append(_close(got, want, _RTOL[ctx.dtype], f"score v{version or 'auto'} {agg}/{pool}/{ks}"))
        else:
            got = tk.score(ctx.dev(q), ctx.dev(k), start, end, aggregation=agg, pooling=pool, kernel_size=ks)
            parts.append(_close(got, want, _RTOL[ctx.dtype], f"score {agg}/{pool}/{ks}"))
    return _combine(*parts)


def _tricky_scores(ctx):
    g = ctx.gen(200)
    s = torch.randint(0, 6, (3, 2, 257), generator=g).to(torch.float32) / 4  # many exact ties
    s[0, 0, 5] = float("nan")
    s[0, 1, :40] = float("-inf")
    s[1, 0, 100:110] = float("inf")
    s[2, 1] = torch.rand(257, generator=g)
    return s


def _check_select(ctx):
    from . import _C
    from . import torch_kernels as tk

    scores = _tricky_scores(ctx)
    parts = []
    for keep in (0, 1, 64, 200, 257):
        want = torch.as_tensor(_C.select(scores, keep))
        if ctx.native:
            got = torch.from_dlpack(_C.select(ctx.dev(scores), keep, stream=ctx.stream))
        else:
            got = tk.select(ctx.dev(scores), keep)
        parts.append(_exact(got, want, f"select keep={keep}"))
    return _combine(*parts)


def _random_indices(ctx, B, A, N, keep, salt):
    g = ctx.gen(salt)
    rows = [torch.sort(torch.randperm(N, generator=g)[:keep]).values for _ in range(B * A)]
    return torch.stack(rows).reshape(B, A, keep)


def _check_compact(ctx):
    from . import _C
    from . import torch_kernels as tk

    B, H, L, start, window = 2, 3, 140, 9, 6
    end = L - window
    parts = []
    for A, keep in ((1, 40), (H, 77)):
        k = ctx.randn(B, H, L, ctx.D, salt=300 + A)
        v = ctx.randn(B, H, L, ctx.D, salt=301 + A)
        idx = _random_indices(ctx, B, A, end - start, keep, 302 + A)
        wk, wv = k.clone(), v.clone()
        n_want = _C.compact(wk, wv, idx, start, end)
        gk, gv = ctx.dev(k), ctx.dev(v)
        if ctx.native:
            n_got = _C.compact(gk, gv, ctx.dev(idx), start, end, stream=ctx.stream)
        else:
            n_got = tk.compact_(gk, gv, ctx.dev(idx), start, end, L)
        parts += [_exact(gk[:, :, :n_want], wk[:, :, :n_want], f"compacted keys (A={A})"),
                  _exact(gv[:, :, :n_want], wv[:, :, :n_want], f"compacted values (A={A})"),
                  (n_got == n_want, 0.0, 0.0, "" if n_got == n_want else f"new length {n_got}, expected {n_want}")]
    return _combine(*parts)


def _margin_ok(scores: torch.Tensor, keep: int, margin: float) -> bool:
    """True when, in every row, the keep-th and (keep+1)-th best scores differ by more than margin."""
    if keep == 0 or keep >= scores.shape[-1]:
        return True
    top = torch.sort(scores.double(), dim=-1, descending=True).values
    gap = top[..., keep - 1] - top[..., keep]
    return bool((gap > margin).all())


def _check_compress(ctx):

    B, H, Hq, W, L, start, keep = 2, 2, 6, 5, 200, 11, 60
    k = ctx.randn(B, H, L, ctx.D, salt=400, scale=1.5)
    v = ctx.randn(B, H, L, ctx.D, salt=401)
    q = ctx.randn(B, Hq, W, ctx.D, salt=402)
    parts = []
    for agg in ("all", "group"):
        outs = []
        for device in (torch.device("cpu"), ctx.device):
            kv = _kv_cache(ctx, B=B, H=H, Hq=Hq, W=W, capacity=256)
            stream = ctx.stream if device.type == "cuda" else None
            kv.append(0, k.to(device), v.to(device), stream=stream)
            kv.record_query(0, q.to(device), stream=stream)
            n, scores, idx = kv.compress(0, start, keep, aggregation=agg, stream=stream, return_details=True)
            outs.append((n, torch.from_dlpack(scores).cpu() if device.type == "cuda" else torch.as_tensor(scores),
                         torch.from_dlpack(idx).cpu() if device.type == "cuda" else torch.as_tensor(idx),
                         torch.from_dlpack(kv.keys(0)).cpu(), torch.from_dlpack(kv.values(0)).cpu()))
            kv.close()
        (n0, s0, i0, k0, v0), (n1, s1, i1, k1, v1) = outs
        tol = _RTOL[ctx.dtype]
        parts.append(_close(s1, s0, tol, f"compress scores ({agg})"))
        parts.append((n0 == n1, 0.0, 0.0, "" if n0 == n1 else f"compress length {n1}, expected {n0}"))
        if _margin_ok(s0, keep, 4 * tol * float(s0.abs().max())):
            parts += [_exact(i1, i0, f"compress kept indices ({agg})"), _exact(k1, k0, f"compressed keys ({agg})"),
                      _exact(v1, v0, f"compressed values ({agg})")]
    return _combine(*parts)


def _check_decode(ctx):
    from . import _C

    B, Hkv, G, cap, length = 3, 2, 4, 300, 237
    Hq = Hkv * G
    q = ctx.randn(B, Hq, 1, ctx.D, salt=500)
    k = ctx.randn(B, Hkv, cap, ctx.D, salt=501, scale=2.0)
    v = ctx.randn(B, Hkv, cap, ctx.D, salt=502)
    padding = torch.tensor([0, 5, 40], dtype=torch.int64)
    outs = []
    for device in (torch.device("cpu"), ctx.device):
        stream = ctx.stream if device.type == "cuda" else None
        out = torch.full((B, 1, Hq, ctx.D), float("nan"), dtype=ctx.dtype, device=device).transpose(1, 2)
        lengths = torch.tensor([length, length + 3], dtype=torch.int64, device=device)
        _C.decode_attention(q.to(device), k.to(device), v.to(device), out, lengths, padding=padding.to(device),
                            stream=stream)
        # the capture path's writes: K/V at lengths[0], the query into the ring at lengths[1]
        ks, vs = k.clone().to(device), v.clone().to(device)
        nk, nv = ctx.randn(B, Hkv, 1, ctx.D, salt=503).to(device), ctx.randn(B, Hkv, 1, ctx.D, salt=504).to(device)
        _C.append_at_length(ks, vs, nk, nv, lengths, stream=stream)
        ring = torch.zeros(B, Hq, 5, ctx.D, dtype=ctx.dtype, device=device)
        _C.ring_write(ring, q.to(device), lengths, offset=2, stream=stream)
        outs.append((out.cpu(), ks.cpu(), vs.cpu(), lengths.cpu(), ring.cpu()))
    (o0, k0, v0, l0, r0), (o1, k1, v1, l1, r1) = outs
    return _combine(_close(o1, o0, _RTOL_OUT[ctx.dtype], "decode_attention output"),
                    _exact(k1, k0, "append_at_length keys"), _exact(v1, v0, "append_at_length values"),
                    _exact(l1, l0, "append_at_length lengths"), _exact(r1, r0, "ring_write"))


def _check_attn_scores(ctx):
    from . import _C
    from . import torch_kernels as tk

    q, k, start, end = _score_case(ctx, salt=600)
    R, L, B = q.shape[2], k.shape[2], q.shape[0]
    positions = torch.arange(L - R, L, dtype=torch.int64)
    padding = torch.tensor([0, 4], dtype=torch.int64)[:B]
    parts = []
    combos = (dict(norm="candidates"), dict(norm="past", gqa="max_logits", query_reduce="mean", aggregation="group",
                                            pooling="max", kernel_size=7),
              dict(norm="causal", aggregation="group", pooling="avg", kernel_size=5),
              dict(norm="causal", aggregation="all", kernel_size=1))
    for combo in combos:
        want = torch.as_tensor(_C.attn_scores(q, k, start, end, query_positions=positions, padding=padding, **combo))
        if ctx.native:
            got = torch.from_dlpack(_C.attn_scores(ctx.dev(q), ctx.dev(k), start, end,
                                                   query_positions=ctx.dev(positions), padding=ctx.dev(padding),
                                                   stream=ctx.stream, **combo))
        else:
            got = tk.attn_scores(ctx.dev(q), ctx.dev(k), start, end, query_positions=ctx.dev(positions),
                                 padding=ctx.dev(padding), **combo)
        parts.append(_close(got, want, _RTOL[ctx.dtype], f"attn_scores {combo}"))
    return _combine(*parts)


def _check_redundancy(ctx):
    from . import _C
    from . import torch_kernels as tk

    B, H, L = 2, 3, 90
    k = ctx.randn(B, H, L, ctx.D, salt=700)
    k[:, :, 10:20] = k[:, :, 30:40]  # near-duplicates, so the "newest of a group" rule matters
    padding = torch.tensor([0, 7], dtype=torch.int64)
    want = torch.as_tensor(_C.redundancy(k, padding=padding, threshold=0.5))
    if ctx.native:
        got = torch.from_dlpack(_C.redundancy(ctx.dev(k), padding=ctx.dev(padding), threshold=0.5, stream=ctx.stream))
    else:
        got = tk.redundancy(ctx.dev(k), padding=ctx.dev(padding), threshold=0.5)
    return _close(got, want, _RTOL[torch.float32] * 10, "redundancy")


def _check_fill(ctx):
    from . import _C
    from . import torch_kernels as tk

    parts = []
    name = "cpu" if ctx.device.type == "cpu" else f"cuda:{ctx.device.index or 0}"
    for kind, seed in (("recent", 0), ("random", 0), ("random", 12345)):
        want = torch.as_tensor(_C.fill_scores(kind, 3, 2, 301, seed=seed, layer=4, compression=7))
        if ctx.native:
            got = torch.from_dlpack(_C.fill_scores(kind, 3, 2, 301, seed=seed, layer=4, compression=7, device=name,
                                                   stream=ctx.stream))
        else:
            got = tk.fill_scores(kind, 3, 2, 301, seed=seed, layer=4, compression=7, device=ctx.device)
        parts.append(_exact(got, want, f"fill {kind} seed={seed}"))
    return _combine(*parts)


def _check_accumulate(ctx):
    from . import torch_kernels as tk

    B, H, Hq, W, L, start, keep = 2, 2, 4, 3, 120, 6, 50
    k = ctx.randn(B, H, L, ctx.D, salt=800, scale=1.5)
    v = ctx.randn(B, H, L, ctx.D, salt=801)
    steps = [ctx.randn(B, Hq, 1, ctx.D, salt=810 + i) for i in range(3)]
    idx = _random_indices(ctx, B, 1, L - W - start, keep, 820)
    outs = []
    for device, impl in ((torch.device("cpu"), "native"), (ctx.device, ctx.impl)):
        kv = _kv_cache(ctx, B=B, H=H, Hq=Hq, W=W, capacity=128, accumulators=True)
        stream = ctx.stream if device.type == "cuda" else None
        kv.set_padding([0, 9])
        kv.append(0, k.to(device), v.to(device), stream=stream)
        acc = torch.from_dlpack(kv.accumulator(0))
        if impl == "native":
            for q in steps:
                kv.accumulate(0, q.to(device), stream=stream)
            before = acc.cpu().clone()
            kv.compact(0, start, idx.to(device), stream=stream)
        else:
            ks = torch.from_dlpack(kv.keys(0))  # the live [B, H, L, D] part of the storage
            vs = torch.from_dlpack(kv.values(0))
            pad = torch.tensor([0, 9], dtype=torch.int64, device=device)
            for q in steps:
                tk.accumulate_(acc, q.to(device), ks, L, padding=pad)
            before = acc.cpu().clone()
            n = tk.compact_(ks, vs, idx.to(device), start, L - W, L, acc=acc)
            kv.set_length(0, n)
        after = torch.from_dlpack(kv.accumulator(0)).cpu().clone()
        outs.append((before, after))
        kv.close()
    (b0, a0), (b1, a1) = outs
    return _combine(_close(b1, b0, _RTOL[ctx.dtype], "accumulated attention"),
                    _close(a1, a0, _RTOL[ctx.dtype], "accumulator after compaction"))


_CHECKS = {
    "copy": _check_copy,
    "score": _check_score,
    "select": _check_select,
    "compact": _check_compact,
    "compress": _check_compress,
    "decode": _check_decode,
    "attn_scores": _check_attn_scores,
    "redundancy": _check_redundancy,
    "fill": _check_fill,
    "accumulate": _check_accumulate,
}


def _main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m rpc_py.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", action="append", help="device(s) to check (default: every CUDA device)")
    parser.add_argument("--impl", choices=("native", "torch"), default="native")
    parser.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16"),
                        help="input dtype(s) (default: float32 and bfloat16)")
    parser.add_argument("--head-dim", type=int, action="append", help="head dimension(s) (default: 64 and 128)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    devices = args.device or [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if not devices:
        print("no CUDA device: nothing to check (use --device cpu --impl torch to check the torch kernels)")
        return 0
    results = []
    for device in devices:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            for head_dim in args.head_dim or [64, 128]:
                results += check(device, dtype=getattr(torch, dtype), head_dim=head_dim, impl=args.impl)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=1)
    return 0 if passed(results) else 1


if __name__ == "__main__":
    raise SystemExit(_main())
