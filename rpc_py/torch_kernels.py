"""Pure-torch versions of every compression kernel family of rpc_py.

What this is for: rpc_py's own CUDA kernels are hand-written for the GPU generations they were tested
on. When one of them fails rpc_py's self-check on hardware nobody has tried yet, these functions give the same results
with nothing but stock torch operators, on whatever device the tensors live on (CPU or CUDA). They
are slower than the kernels and compute in float32 (float16/bfloat16 inputs are upcast one chunk at a
time), but follow the kernels' conventions exactly: the same ranges, the same clamping, the same
treatment of NaN/inf, the same tie rule, the same random bits.

The code here is written from the contracts in ``docs/design.md`` and ``csrc/rpc.h``; it shares no code
with the kernels (``rpc_py._C``) nor with the float64 oracles (``rpc_py.reference``,
``rpc_py.policy_reference``), which the tests use to check it.

On CUDA nothing here synchronizes with the host: no ``.item()``, no data-dependent shapes, no Python
branch on a tensor value. Every shape follows from the arguments' shapes and Python ints. Per-sequence
``padding`` and ``query_positions`` may be Python sequences of ints or int64 tensors; on CUDA pass
int64 tensors already on the device, because a sequence (or a CPU tensor) has to be copied there
first. Index rows given to ``compact_`` on a CUDA device are not validated (that would need a read on
the host); they are clamped into range so that bad rows give wrong contents, never bad memory
accesses. On the CPU they are checked like the C kernel does.

Large problems are cut into chunks (over the batch, then over KV heads) so that one float32 logits
temporary stays under ``CHUNK_BYTES``; a single sequence and KV head is never split.

Scores semantics (all functions return float32):

* ``score`` is RPC's score (softmax over the candidates only, summed over the selector queries,
  averaged over heads, 1-D pooling). It is ``attn_scores`` with RPC's options (``norm="candidates"``,
  ``gqa="mean_probs"``, ``query_reduce="sum"``), NaN/inf rule included. (``rpc_py._C.score`` leaves
  NaN/inf logits unspecified: its oracle returns NaN there and its CPU fast path something else.)
* In ``attn_scores`` (and ``score``, ``accumulate_``), a query whose denominator range is empty, or
  whose logits in that range hold a NaN or +inf, or are all -inf, contributes nothing (the oracle's
  softmax is NaN there and it replaces NaN by 0).
* ``select`` ranks by score descending, ties to the lower index, every NaN below every number
  (-inf included), -0.0 equal to +0.0; it returns the kept offsets ascending.

Matrix products go through ``torch.matmul``: with TF32 enabled for CUDA matmuls
(``torch.backends.cuda.matmul.allow_tf32``) the logits are computed in TF32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CHUNK_BYTES",
    "score",
    "attn_scores",
    "redundancy",
    "fill_scores",
    "select",
    "compact_",
    "accumulate_",
    "append_",
    "ring_write_",
]

#: Upper bound, in bytes, of one float32 logits (or similarity) temporary; larger problems are chunked.
CHUNK_BYTES = 256 << 20

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------- helpers


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_float(t, name, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {list(t.shape)}")


def _check_kernel_size(kernel_size):
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd integer >= 1, got {kernel_size!r}")


def _scale(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    s = float(scale)
    if not math.isfinite(s) or abs(s) > torch.finfo(torch.float32).max:
        raise ValueError(f"scale: expected a finite float32 value, got {scale!r}")
    return s


def _int_vector(x, name, length, device, nonneg=False):
    """None, a sequence of ints or an integer tensor of ``length`` entries -> int64 tensor on ``device``.

    A tensor already on ``device`` is used as is (no copy, no host read). Anything else is copied
    there, which on CUDA means a host-to-device transfer. With ``nonneg``, values the host can see
    (a sequence, a CPU tensor) must be >= 0, as the C binding requires; device values are not read
    (the callers clamp them).
    """
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor, got {x.dtype}")
        if x.dim() != 1 or x.shape[0] != length:
            raise ValueError(f"{name}: expected a 1-D tensor of {length} entries, got shape {list(x.shape)}")
        if nonneg and x.device.type == "cpu" and bool((x < 0).any()):
            raise ValueError(f"{name}: expected values >= 0")
        return x.to(device=device, dtype=torch.int64)
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence) and not hasattr(x, "__len__"):
        raise TypeError(f"{name}: expected a sequence of ints or an int64 tensor, got {type(x).__name__}")
    values = [int(v) for v in x]
    if len(values) != length:
        raise ValueError(f"{name}: expected {length} entries, got {len(values)}")
    if nonneg and any(v < 0 for v in values):
        raise ValueError(f"{name}: expected values >= 0, got {values}")
    return torch.as_tensor(values, dtype=torch.int64).to(device)


def pool(scores, pooling, kernel_size):
    """RPC's pooling alone (``[..., N]`` float32 scores, stride 1, padding ``kernel_size // 2``): ``avg``
    counts the zero padding, ``max`` ignores it and propagates NaN. What ``rpc_py._C.pool`` computes."""
    _choice("pooling", pooling, ("avg", "max"))
    _check_kernel_size(kernel_size)
    return _pool(scores.to(torch.float32), pooling, kernel_size)


def _pool(raw, pooling, kernel_size):
    """1-D pooling along the last axis, stride 1, padding kernel_size // 2. ``avg`` divides by the full
    kernel size (the zero padding counts), ``max`` never picks the padding and propagates NaN."""
    if kernel_size == 1:
        return raw.clone()
    half = kernel_size // 2
    if pooling == "avg":
        windows = F.pad(raw, (half, half)).unfold(-1, kernel_size, 1)
        return windows.sum(dim=-1) / kernel_size
    windows = F.pad(raw, (half, half), value=-math.inf).unfold(-1, kernel_size, 1)
    return windows.amax(dim=-1)


def _chunks(B, H, bytes_per_head):
    """(batch chunk, head chunk) so that bc * hc * bytes_per_head <= CHUNK_BYTES (at least 1 x 1)."""
    per_seq = bytes_per_head * max(H, 1)
    if per_seq <= CHUNK_BYTES:
        return max(1, min(B, CHUNK_BYTES // max(per_seq, 1))), max(H, 1)
    return 1, max(1, min(H, CHUNK_BYTES // max(bytes_per_head, 1)))


def _attention_sums(queries, keys, start, end, lo, hi, span, max_logits, scale, weights=None):
    """Per KV head, the sum over its query rows of each candidate's softmax probability.

    queries [B, Hq, R, D], keys [B, Hkv, >= span[1], D]. Query r of sequence b normalizes over the key
    positions [lo[b, r], hi[b, r]) (int64 [B, R] tensors on the device; None: the candidates
    [start, end) for every query). Only keys in ``span`` = (s0, s1) are read; every range lies inside it.
    Rows: the G*R (query head, query) pairs of the KV head, or, with ``max_logits``, the R queries
    whose logits are the maximum over the G query heads. ``weights`` (float32 [R] or None) multiply each
    query's probabilities. Returns float32 [B, Hkv, end - start].
    """
    B, Hq, R, D = queries.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    s0, s1 = span
    S, N = s1 - s0, end - start
    c0, c1 = start - s0, end - s0
    device = queries.device
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=device)
    if B == 0 or N == 0:
        return out
    pos = torch.arange(s0, s1, device=device)
    bc, hc = _chunks(B, Hkv, G * R * S * 4)
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        nb = b1 - b0
        for h0 in range(0, Hkv, hc):
            h1 = min(Hkv, h0 + hc)
            nh = h1 - h0
            q = queries[b0:b1, h0 * G:h1 * G].to(torch.float32) * scale  # [nb, nh*G, R, D]
            q = q.reshape(nb, nh, G * R, D)
            k = keys[b0:b1, h0:h1, s0:s1].to(torch.float32)  # [nb, nh, S, D]
            logits = torch.matmul(q, k.transpose(-1, -2)).reshape(nb, nh, G, R, S)
            if max_logits:
                logits = logits.amax(dim=2, keepdim=True)  # NaN-propagating, [nb, nh, 1, R, S]
            if lo is not None:
                allowed = (pos >= lo[b0:b1, :, None]) & (pos < hi[b0:b1, :, None])  # [nb, R, S]
                logits = logits.masked_fill(~allowed[:, None, None], -math.inf)
            m = logits.amax(dim=-1, keepdim=True)
            usable = torch.isfinite(m)  # not empty, no NaN, no +inf, not all -inf
            e = logits.sub_(torch.where(usable, m, torch.zeros_like(m))).exp_()  # logits is ours: in place
            total = e.sum(dim=-1, keepdim=True)
            probs = torch.where(usable, e[..., c0:c1] / total, torch.zeros((), device=device))
            del e
            if weights is not None:
                probs = probs * weights[:, None]  # [.., R, N]
            out[b0:b1, h0:h1] = probs.sum(dim=(2, 3))
    return out


def _check_qk(queries, keys):
    _check_float(queries, "queries", 4)
    _check_float(keys, "keys", 4)
    if keys.dtype != queries.dtype:
        raise ValueError(f"keys: expected dtype {queries.dtype} (the queries' dtype), got {keys.dtype}")
    if keys.device != queries.device:
        raise ValueError(f"keys: expected device {queries.device} (the queries' device), got {keys.device}")
    B, Hq, R, D = queries.shape
    if keys.shape[0] != B or keys.shape[3] != D:
        raise ValueError(f"keys: expected shape [{B}, Hkv, L, {D}], got {list(keys.shape)}")
    Hkv = keys.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"keys: {Hkv} KV heads do not divide {Hq} query heads")
    if R < 1 or D < 1:
        raise ValueError(f"queries: expected R >= 1 and D >= 1, got shape {list(queries.shape)}")


# ------------------------------------------------------------------------------------------ scores


def attn_scores(queries, keys, start, end, *, query_positions=None, padding=None, norm="candidates",
                gqa="mean_probs", query_reduce="sum", aggregation="all", pooling="avg", kernel_size=1,
                scale=None, raw=False, query_weights=None):
    """Window-attention scores of the candidates ``keys[:, :, start:end]``: float32 ``[B, A, N]``.

    queries ``[B, Hq, R, D]`` (oldest first), keys ``[B, Hkv, L, D]``, same float dtype and device, any
    strides. ``norm``: each query's softmax denominator is ``[start, end)`` (``"candidates"``; padding
    not applied), ``[padding[b], end)`` (``"past"``) or ``[padding[b], query_positions[r] + 1)``
    (``"causal"``), every bound clamped into ``[0, L]``. ``gqa``: ``"mean_probs"`` (softmax per query
    head, averaged over Hq heads for ``aggregation="all"`` or each KV head's G heads for ``"group"``) or
    ``"max_logits"`` (the G heads' logits max-pooled before one softmax per KV head; ``all`` averages
    KV heads). ``query_reduce``: ``"sum"`` or ``"mean"`` over the R queries; ``query_weights``: R weights
    of the queries' probabilities in that sum (None: all 1; a list, or a float tensor on the device). Pooling as ``score``
    (``kernel_size`` 1: none). ``scale`` defaults to ``1/sqrt(D)``. ``raw=True`` returns ``(pooled,
    unpooled)``. A query with an empty range, or whose logits in range hold NaN/+inf, contributes 0.
    """
    _choice("norm", norm, ("candidates", "past", "causal"))
    _choice("gqa", gqa, ("mean_probs", "max_logits"))
    _choice("query_reduce", query_reduce, ("sum", "mean"))
    _choice("aggregation", aggregation, ("all", "group"))
    _choice("pooling", pooling, ("avg", "max"))
    _check_kernel_size(kernel_size)
    _check_qk(queries, keys)
    B, Hq, R, D = queries.shape
    _, Hkv, L, _ = keys.shape
    G = Hq // Hkv
    start, end = int(start), int(end)
    if not 0 <= start < end <= L:
        raise ValueError(f"start, end: expected 0 <= start < end <= {L}, got {start}, {end}")
    device = queries.device
    sc = _scale(scale, D)
    pads = _int_vector(padding, "padding", B, device, nonneg=True)
    qpos = _int_vector(query_positions, "query_positions", R, device)
    if norm == "causal" and qpos is None:
        raise ValueError("query_positions: required with norm='causal' (the key position of each query)")

    if norm == "candidates":
        lo = hi = None
        span = (start, end)
    else:
        lo_b = torch.zeros(B, dtype=torch.int64, device=device) if pads is None else pads.clamp(0, L)
        lo = lo_b[:, None].expand(B, R)
        if norm == "past":
            hi = torch.full((B, R), end, dtype=torch.int64, device=device)
            span = (0, end)
        else:
            # query r attends to [.., qpos + 1), i.e. up to its own key; clamp first so that no value overflows
            hi = (qpos.clamp(-1, L - 1) + 1)[None, :].expand(B, R)
            span = (0, L)
    weights = None
    if query_weights is not None:
        weights = (query_weights if isinstance(query_weights, torch.Tensor)
                   else torch.as_tensor(query_weights, dtype=torch.float32))
        weights = weights.to(device=device, dtype=torch.float32).reshape(-1)
        if weights.numel() != R:
            raise ValueError(f"query_weights: expected {R} entries, got {weights.numel()}")
    sums = _attention_sums(queries, keys, start, end, lo, hi, span, gqa == "max_logits", sc, weights)

    if gqa == "mean_probs":
        heads = Hq if aggregation == "all" else G
    else:
        heads = Hkv if aggregation == "all" else 1
    divisor = heads * (R if query_reduce == "mean" else 1)
    raw_scores = sums.sum(dim=1, keepdim=True) if aggregation == "all" else sums
    raw_scores = raw_scores / divisor
    pooled = _pool(raw_scores, pooling, kernel_size)
    return (pooled, raw_scores) if raw else pooled


def score(queries, keys, start, end, *, aggregation="all", pooling="avg", kernel_size=7, raw=False):
    """RPC's scores of the candidates ``keys[:, :, start:end]``: float32 ``[B, A, N]``.

    Softmax of ``q . k / sqrt(D)`` over the candidates only, summed over the R selector queries,
    averaged over all query heads (``aggregation="all"``, A = 1) or each KV head's G query heads
    (``"group"``, A = Hkv), then 1-D pooling (stride 1, padding ``kernel_size // 2``; ``avg`` counts the
    zero padding, ``max`` ignores it). queries ``[B, Hq, R, D]``, keys ``[B, Hkv, L, D]``, any strides.
    ``raw=True`` returns ``(pooled, unpooled)``. Equal to ``attn_scores`` with ``norm="candidates"``,
    ``gqa="mean_probs"``, ``query_reduce="sum"`` (including: a query whose candidate logits hold NaN or
    +inf contributes nothing).
    """
    return attn_scores(queries, keys, start, end, aggregation=aggregation, pooling=pooling,
                       kernel_size=kernel_size, raw=raw)


def redundancy(keys, *, padding=None, threshold=0.5):
    """R-KV's redundancy of every key: float32 ``[B, Hkv, L]`` (0 at padded positions).

    Per sequence and KV head, over the valid keys ``[padding[b], L)`` (padding clamped into ``[0, L]``):
    cosine similarities ``k / (|k| + 1e-8)`` of every pair, diagonal zeroed; in each row the newest
    column whose similarity exceeds ``threshold`` (the first valid column when none does) is zeroed
    too; the column means are softmax-normalized over the valid columns. A NaN key makes its head's
    valid positions NaN.
    """
    _check_float(keys, "keys", 4)
    thr = float(threshold)
    if math.isnan(thr):
        raise ValueError("threshold: expected a number, got NaN")
    B, H, L, D = keys.shape
    device = keys.device
    out = torch.zeros(B, H, L, dtype=torch.float32, device=device)
    if B * H * L == 0:
        return out
    pads = _int_vector(padding, "padding", B, device, nonneg=True)
    lo = torch.zeros(B, dtype=torch.int64, device=device) if pads is None else pads.clamp(0, L)
    n = (L - lo).to(torch.float32)  # valid keys per sequence
    pos = torch.arange(L, device=device, dtype=torch.int32)
    lo = lo.to(torch.int32)
    # "sim > threshold" with sim float32 and threshold a double is "sim >= the smallest float32 above
    # threshold": found on the host once, so the test runs in float32 without a float64 temporary.
    above_thr = _float32_above(thr)
    valid = pos[None, :] >= lo[:, None]  # [B, L]
    # Rows are cut into blocks too: one block of the similarity matrix is [bc, hc, rows, L].
    bc, hc = _chunks(B, H, L * L * 4)
    rows = L
    if bc == 1 and hc == 1 and L * L * 4 > CHUNK_BYTES:
        rows = max(1, CHUNK_BYTES // (L * 4))
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            k = keys[b0:b1, h0:h1].to(torch.float32)
            kn = k / (torch.linalg.vector_norm(k, dim=-1, keepdim=True) + 1e-8)
            lo_c = lo[b0:b1, None, None, None]  # [nb, 1, 1, 1]
            col_ok = valid[b0:b1, None, None, :]  # [nb, 1, 1, L]
            cols = torch.zeros(b1 - b0, h1 - h0, L, dtype=torch.float32, device=device)
            for i0 in range(0, L, rows):
                i1 = min(L, i0 + rows)
                sim = torch.matmul(kn[:, :, i0:i1], kn.transpose(-1, -2))  # [nb, nh, rows, L]
                row_pos = pos[i0:i1, None]
                sim.masked_fill_(pos[None, :] == row_pos, 0.0)  # the diagonal, before the threshold test
                above = (sim >= above_thr) & (pos > lo_c)  # the first valid column is the default anyway
                newest = torch.where(above, pos, lo_c).amax(dim=-1, keepdim=True)  # [nb, nh, rows, 1]
                keep = col_ok & (pos != newest) & (row_pos >= lo_c)  # valid row, valid column, not the newest
                cols += sim.masked_fill_(~keep, 0.0).sum(dim=2)
                del sim, above, keep
            means = (cols / n[b0:b1, None, None]).masked_fill(~valid[b0:b1, None, :], -math.inf)
            soft = torch.softmax(means, dim=-1)  # NaN anywhere in a head's valid columns -> NaN head
            out[b0:b1, h0:h1] = torch.where(valid[b0:b1, None, :], soft, torch.zeros((), device=device))
    return out


def _float32_above(x):
    """The smallest float32 value strictly greater than the double ``x`` (inf above the float32 range;
    NaN, which nothing reaches, for x = +inf)."""
    if x == math.inf:
        return math.nan
    t = torch.tensor(x, dtype=torch.float32)  # round to nearest (CPU, host-side scalar)
    if float(t) <= x:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=torch.float32))
    return float(t)


def _mix64(x):
    """splitmix64's finalizer on uint64 values held in int64 (Python int or int64 tensor).

    Additions and multiplications wrap in two's complement either way; right shifts are made logical
    by masking off the copies of the sign bit an arithmetic shift brings in."""
    if isinstance(x, int):
        x = (x + 0x9E3779B97F4A7C15) & _U64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
        return x ^ (x >> 31)
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _lsr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _lsr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _lsr(x, 31)


def _signed(u):
    """A uint64 value as the int64 with the same bits."""
    u &= _U64
    return u - (1 << 64) if u >= 1 << 63 else u


def _lsr(x, s):
    """Logical right shift of int64 tensor bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def fill_scores(kind, batch, rows, n, *, seed=0, layer=0, compression=0, device="cpu"):
    """Data-free scores ``[batch, rows, n]`` float32 on ``device``.

    ``"recent"``: candidate j scores j (``n <= 2**24``, exact in float32), so the newest are kept.
    ``"random"``: splitmix64's finalizer chained over (seed, layer, compression, row = b * rows + a, j),
    the top 24 bits times 2**-24, the same bits as ``rpc_py._C.fill_scores`` on every device. ``seed``,
    ``layer``, ``compression``: any Python ints, taken modulo 2**64.
    """
    _choice("kind", kind, ("recent", "random"))
    batch, rows, n = int(batch), int(rows), int(n)
    if batch < 0 or rows < 0 or n < 0:
        raise ValueError(f"batch, rows, n: expected non-negative sizes, got {batch}, {rows}, {n}")
    device = torch.device(device)
    if kind == "recent":
        if n > 1 << 24:
            raise ValueError(f"n: expected at most 2**24 candidates with kind='recent', got {n}")
        return torch.arange(n, dtype=torch.float32, device=device).expand(batch, rows, n).contiguous()
    # The first three links of the chain depend on Python ints only.
    h = _mix64(int(seed) & _U64)
    h = _mix64(h ^ (int(layer) & _U64))
    h = _mix64(h ^ (int(compression) & _U64))
    row = torch.arange(batch * rows, dtype=torch.int64, device=device)
    hr = _mix64(row ^ _signed(h))  # [batch * rows]
    j = torch.arange(n, dtype=torch.int64, device=device)
    bits = _lsr(_mix64(hr[:, None] ^ j[None, :]), 40)  # 24 bits
    return (bits.to(torch.float32) * (1.0 / 16777216.0)).reshape(batch, rows, n)


# --------------------------------------------------------------------------------------- selection


def select(scores, keep):
    """int64 ``[..., keep]``: per row of ``scores`` ``[..., N]``, the offsets of the ``keep`` best
    scores, ascending. Ranking: larger score first, ties to the lower index, every NaN after every
    number (-inf included), -0.0 equal to +0.0. Scores are ranked as float32 (float16/bfloat16 are
    widened exactly; float64 is rounded, as the C kernel only takes float32).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 1:
        raise ValueError("scores: expected at least one dimension")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores: expected a floating dtype, got {scores.dtype}")
    N = scores.shape[-1]
    keep = int(keep)
    if not 0 <= keep <= N:
        raise ValueError(f"keep: expected 0 <= keep <= {N} (the number of candidates), got {keep}")
    s = scores.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0: one zero
    # Order-preserving integer image of the float: non-negative floats keep their bits, negative
    # ones get their magnitude bits flipped; NaN goes below -inf.
    bits = s.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    ordered = torch.where(torch.isnan(s), torch.full_like(ordered, -(1 << 31)), ordered)
    # A unique key per entry: score in the high half, reversed index in the low half, so that larger
    # keys rank first and equal scores go to the lower index. topk on unique keys has no tie to break.
    idx = torch.arange(N, dtype=torch.int64, device=s.device)
    key = ordered * (1 << 32) + ((1 << 32) - 1 - idx)
    top = torch.topk(key, keep, dim=-1, largest=True, sorted=False).indices
    return torch.sort(top, dim=-1).values


# --------------------------------------------------------------------------------------- compaction


def compact_(keys, values, indices, start, end, length, acc=None):
    """In place on storage views ``keys``/``values`` ``[B, H, cap, D]`` whose live tokens are
    ``[0, length)``: positions ``[0, start)`` stay, the kept candidates ``start + indices[b, a, i]`` move
    to ``[start, start + keep)``, the window ``[end, length)`` follows. Returns the new length
    ``start + keep + (length - end)``; the contents from there to ``length`` are stale.

    indices: int64 ``[B, 1 or H, keep]``, strictly ascending offsets in ``[0, end - start)`` (one row for
    all heads, or one per head). CPU: checked (``ValueError``, nothing touched). Other devices: not
    read; clamped into range, so malformed rows give wrong contents but stay in bounds.
    acc: optional float32 ``[B, H, cap]`` accumulator (H2O), compacted the same way; its positions in
    ``[new_length, length)`` are zeroed.
    """
    for t, name in ((keys, "keys"), (values, "values")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D torch.Tensor [B, H, cap, D]")
    B, H, cap, _ = keys.shape
    if tuple(values.shape[:3]) != (B, H, cap) or values.device != keys.device:
        raise ValueError(f"values: expected shape [{B}, {H}, {cap}, D] on {keys.device}, got "
                         f"{list(values.shape)} on {values.device}")
    start, end, length = int(start), int(end), int(length)
    if not 0 <= start <= end <= length <= cap:
        raise ValueError(f"start, end, length: expected 0 <= start <= end <= length <= {cap}, got {start}, {end}, "
                         f"{length}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.shape[0] != B or \
            indices.shape[1] not in (1, H):
        shape = list(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices: expected an int64 tensor [{B}, 1 or {H}, keep], got {shape}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices: expected an integer tensor, got {indices.dtype}")
    keep, N, window = indices.shape[2], end - start, length - end
    if keep > N:
        raise ValueError(f"indices: keep = {keep} exceeds the {N} candidates")
    if acc is not None:
        if not isinstance(acc, torch.Tensor) or acc.dtype != torch.float32 or tuple(acc.shape) != (B, H, cap) \
                or acc.device != keys.device:
            raise ValueError(f"acc: expected a float32 tensor [{B}, {H}, {cap}] on {keys.device}")
    if indices.device.type == "cpu" and keep > 0:
        rows = indices.reshape(-1, keep)
        bad = (rows < 0) | (rows >= N)
        if keep > 1:
            bad[:, 1:] |= rows[:, 1:] <= rows[:, :-1]
        if bool(bad.any()):
            raise ValueError("indices: expected strictly ascending offsets in [0, end - start) in every row")
    new_length = start + keep + window
    moved = keep + window
    if moved > 0:
        idx = indices.to(device=keys.device, dtype=torch.int64)
        if N > 0:
            idx = idx.clamp(0, N - 1)
        src = torch.cat([(idx + start).expand(B, H, keep),
                         torch.arange(end, length, device=keys.device).expand(B, H, window)], dim=-1)
        for t in (keys, values):
            gathered = torch.gather(t[:, :, :length], 2, src[..., None].expand(B, H, moved, t.shape[3]))
            t[:, :, start:new_length] = gathered  # the gather made a copy: overlap is harmless
        if acc is not None:
            acc[:, :, start:new_length] = torch.gather(acc[:, :, :length], 2, src)
    if acc is not None and new_length < length:
        acc[:, :, new_length:length] = 0.0
    return new_length


# ------------------------------------------------------------------------------------------- H2O


def accumulate_(acc, query, keys, length, *, padding=None, scale=None):
    """One H2O step, in place: ``acc[b, h, j] += sum over the G query heads of KV head h of
    softmax_j(q . k_j * scale)`` for j in ``[padding[b], length)`` (padding clamped into ``[0, length]``);
    ``acc`` elsewhere is not written.

    acc: float32 ``[B, Hkv, >= length]``; query ``[B, Hq, 1, D]`` (its own key is position
    ``length - 1``); keys: the storage view ``[B, Hkv, >= length, D]``, the query's dtype. ``scale``
    defaults to ``1/sqrt(D)``. A query head whose logits hold NaN/+inf adds nothing.
    """
    _check_float(query, "query", 4)
    _check_float(keys, "keys", 4)
    if query.shape[2] != 1:
        raise ValueError(f"query: expected one token [B, Hq, 1, D], got shape {list(query.shape)}")
    _check_qk(query, keys)
    B, Hq, _, D = query.shape
    Hkv = keys.shape[1]
    length = int(length)
    if not 0 <= length <= keys.shape[2]:
        raise ValueError(f"length: expected 0 <= length <= {keys.shape[2]}, got {length}")
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.float32 or acc.dim() != 3 or \
            tuple(acc.shape[:2]) != (B, Hkv) or acc.shape[2] < length or acc.device != query.device:
        raise ValueError(f"acc: expected a float32 tensor [{B}, {Hkv}, >= {length}] on {query.device}")
    device = query.device
    sc = _scale(scale, D)
    pads = _int_vector(padding, "padding", B, device, nonneg=True)
    if B == 0 or length == 0:
        return None
    lo_b = torch.zeros(B, dtype=torch.int64, device=device) if pads is None else pads.clamp(0, length)
    lo = lo_b[:, None]
    hi = torch.full((B, 1), length, dtype=torch.int64, device=device)
    sums = _attention_sums(query, keys, 0, length, lo, hi, (0, length), False, sc)  # [B, Hkv, length]
    live = acc[:, :, :length]
    valid = torch.arange(length, device=device)[None, None, :] >= lo_b[:, None, None]
    live.copy_(torch.where(valid, live + sums, live))
    return None


# ----------------------------------------------------------------------------------------- copies


def append_(store_k, store_v, keys, values, length):
    """Copy ``keys``/``values`` ``[B, H, t, D]`` into positions ``[length, length + t)`` of the storage
    views ``[B, H, cap, D]``; returns the new length ``length + t``."""
    length = int(length)
    t = keys.shape[2]
    if tuple(values.shape) != tuple(keys.shape):
        raise ValueError(f"values: expected shape {list(keys.shape)} (the keys' shape), got {list(values.shape)}")
    cap = store_k.shape[2]
    if tuple(store_v.shape) != tuple(store_k.shape):
        raise ValueError("store_v: expected the shape of store_k")
    if not 0 <= length <= cap - t:
        raise ValueError(f"length: {t} tokens at position {length} do not fit a capacity of {cap}")
    store_k[:, :, length:length + t] = keys
    store_v[:, :, length:length + t] = values
    return length + t


def ring_write_(ring, queries, slot):
    """Write ``queries`` ``[B, Hq, t, D]`` into the query ring ``[B, Hq, W, D]``: token i goes to slot
    ``(slot + i) % W`` (usually t = 1)."""
    W = ring.shape[2]
    t = queries.shape[2]
    if W < 1 or t > W:
        raise ValueError(f"queries: {t} tokens do not fit a ring of {W} slots")
    slot = int(slot) % W
    for i in range(t):
        ring[:, :, (slot + i) % W] = queries[:, :, i]
    return None
