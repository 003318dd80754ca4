"""Pure-torch float64 oracle of the selection policies other than RPC (docs/policies.md).

Like ``rpc_py.reference`` (RPC's own oracle, which ``policy="rpc"`` keeps using), everything here
is written for reading: float64, one step per line, no code shared with the C/CUDA kernels. The
kernel tests compare against these functions.

Conventions shared by every function (the cache layout of one layer at a compression):

* ``keys`` ``[B, Hkv, L, D]``: the live cache; positions ``[0, padding[b])`` of sequence ``b`` are
  left padding and never enter a softmax.
* ``queries`` ``[B, Hq, Rq, D]``: selector queries, oldest first; query ``r`` sits at key position
  ``query_positions[r]`` (its own key), which bounds what it may attend to under ``norm="causal"``.
* candidates are positions ``[start, end)``, ``N = end - start``; the prompt ``[0, start)`` and the
  recent window ``[end, L)`` are always kept and never selected.
* every score function returns ``[B, A, N]`` float64 with ``A = 1`` (``aggregation="all"``: one kept
  set per sequence) or ``A = Hkv`` (``"group"``: one per KV head). Larger is kept first; selection
  and compaction are RPC's own (``reference.select_reference`` / ``compact_reference``).
"""

from __future__ import annotations

import math

import torch

from .reference import _pool

__all__ = [
    "window_attention_reference",
    "recent_scores_reference",
    "random_scores_reference",
    "random_uniform_reference",
    "tova_scores_reference",
    "h2o_accumulate_reference",
    "h2o_scores_reference",
    "snapkv_scores_reference",
    "redundancy_reference",
    "rkv_scores_reference",
]

_M64 = (1 << 64) - 1


def _check(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _padding(padding, B):
    if padding is None:
        return [0] * B
    pads = [int(p) for p in torch.as_tensor(padding).reshape(-1).tolist()]
    if len(pads) != B:
        raise ValueError(f"padding: expected {B} entries, got {len(pads)}")
    return pads


def window_attention_reference(queries, keys, start, end, *, query_positions=None, padding=None,
                               norm="candidates", gqa="mean_probs", query_reduce="sum", aggregation="all",
                               pooling="avg", kernel_size=1, query_weights=None):
    """Attention the selector queries pay to each candidate, the importance signal of every
    attention-based policy. Returns ``(pooled, raw)``, each ``[B, A, N]`` float64.

    norm: which keys share a query's softmax denominator:
        ``"candidates"`` ``[start, end)`` (RPC); ``"past"`` ``[padding[b], end)`` (R-KV: every key
        older than the window); ``"causal"`` ``[padding[b], query_positions[r] + 1)``: the attention
        the model actually computed (TOVA, H2O, SnapKV).
    gqa: how the G query heads of a KV head combine: ``"mean_probs"`` softmax per query head, then
        averaged (over G for ``group``, over all Hq heads for ``all``); ``"max_logits"`` the group's
        logits are max-pooled before one softmax per KV head (R-KV), ``all`` then averages KV heads.
    query_reduce: ``"sum"`` (RPC, SnapKV) or ``"mean"`` (R-KV) over the queries.
    query_weights: ``R`` numbers, the weight of each query's probabilities in that sum (``None``: all 1):
        how queries are weighted (e.g. only the newest: TOVA; more weight to recent ones).
    pooling, kernel_size: 1-D pooling of the aggregated scores along the candidates (``kernel_size=1``:
        none), stride 1, padding ``kernel_size // 2``; as in RPC, ``avg`` counts the zero padding.
    """
    _check("norm", norm, ("candidates", "past", "causal"))
    _check("gqa", gqa, ("mean_probs", "max_logits"))
    _check("query_reduce", query_reduce, ("sum", "mean"))
    _check("aggregation", aggregation, ("all", "group"))
    _check("pooling", pooling, ("avg", "max"))
    B, Hq, Rq, D = queries.shape
    _, Hkv, L, _ = keys.shape
    if Hq % Hkv:
        raise ValueError(f"keys: {Hkv} KV heads do not divide {Hq} query heads")
    G = Hq // Hkv
    if not 0 <= start < end <= L:
        raise ValueError(f"start, end: expected 0 <= start < end <= {L}, got {start}, {end}")
    pads = _padding(padding, B)
    if norm == "causal":
        if query_positions is None:
            raise ValueError("query_positions: required with norm='causal'")
        qpos = [int(p) for p in torch.as_tensor(query_positions).reshape(-1).tolist()]
        if len(qpos) != Rq:
            raise ValueError(f"query_positions: expected {Rq} entries, got {len(qpos)}")
    N = end - start

    q = queries.to(torch.float64).reshape(B, Hkv, G, Rq, D)
    k = keys.to(torch.float64)
    logits = torch.einsum("bkgrd,bknd->bkgrn", q, k) / math.sqrt(D)  # [B, Hkv, G, Rq, L]
    if gqa == "max_logits":
        logits = logits.amax(dim=2, keepdim=True)  # [B, Hkv, 1, Rq, L]

    # The denominator's key range, per sequence and query: everything else is masked out.
    pos = torch.arange(L)
    allowed = torch.zeros(B, Rq, L, dtype=torch.bool)
    for b in range(B):
        for r in range(Rq):
            if norm == "candidates":
                lo, hi = start, end
            elif norm == "past":
                lo, hi = pads[b], end
            else:
                lo, hi = pads[b], qpos[r] + 1
            allowed[b, r] = (pos >= lo) & (pos < hi)
    masked = logits.masked_fill(~allowed[:, None, None], -math.inf)
    probs = torch.softmax(masked, dim=-1)[..., start:end]  # candidates only, [B, Hkv, g, Rq, N]
    probs = torch.nan_to_num(probs, nan=0.0)  # a query whose range is empty contributes nothing
    if query_weights is not None:
        w = torch.as_tensor(query_weights, dtype=torch.float64).reshape(-1)
        if w.numel() != Rq:
            raise ValueError(f"query_weights: expected {Rq} entries, got {w.numel()}")
        probs = probs * w[:, None]  # [.., Rq, N] weighted per query
    per_head = probs.sum(dim=3) if query_reduce == "sum" else probs.mean(dim=3)  # [B, Hkv, g, N]

    if gqa == "mean_probs":
        raw = per_head.reshape(B, Hq, N).mean(dim=1, keepdim=True) if aggregation == "all" else per_head.mean(dim=2)
    else:
        per_kv = per_head[:, :, 0]  # [B, Hkv, N]
        raw = per_kv.mean(dim=1, keepdim=True) if aggregation == "all" else per_kv
    pooled = _pool(raw, pooling, kernel_size) if kernel_size > 1 else raw.clone()
    return pooled, raw


def recent_scores_reference(B, A, N):
    """``recent``: the score of candidate ``j`` is ``j``, so the top ``keep`` are the newest."""
    return torch.arange(N, dtype=torch.float64).expand(B, A, N).clone()


def _mix64(x: int) -> int:
    # splitmix64's finalizer: a bijection of 64-bit integers with good avalanche.
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def random_uniform_reference(seed: int, layer: int, compression: int, row: int, j: int) -> float:
    """The uniform [0, 1) number of the ``random`` policy for candidate ``j`` of score row ``row``
    (``b * A + a``) at a layer's ``compression``-th compression (0-based). 24 bits, exact in float32."""
    h = _mix64(seed & _M64)
    h = _mix64(h ^ (layer & _M64))
    h = _mix64(h ^ (compression & _M64))
    h = _mix64(h ^ (row & _M64))
    return (_mix64(h ^ (j & _M64)) >> 40) * 2.0**-24


def random_scores_reference(B, A, N, *, seed, layer, compression):
    """``random``: independent uniform scores from a counter-based hash, identical on every device."""
    out = torch.empty(B, A, N, dtype=torch.float64)
    for b in range(B):
        for a in range(A):
            for j in range(N):
                out[b, a, j] = random_uniform_reference(seed, layer, compression, b * A + a, j)
    return out


def tova_scores_reference(query, keys, start, end, *, padding=None, aggregation="all"):
    """``tova``: the attention of the newest query alone (``query`` ``[B, Hq, 1, D]``, at key
    position ``L - 1``), softmax over every valid key, head-averaged, no pooling."""
    L = keys.shape[2]
    return window_attention_reference(query, keys, start, end, query_positions=[L - 1], padding=padding,
                                      norm="causal", aggregation=aggregation, kernel_size=1)[0]


def h2o_accumulate_reference(acc, query, keys, *, padding=None):
    """One decode step of ``h2o``: ``acc`` ``[B, Hkv, L]`` plus the attention of ``query``
    ``[B, Hq, 1, D]`` (at position ``L - 1``) summed over each KV head's query heads. Returns a new
    float64 tensor; padded positions stay untouched."""
    B, Hq, _, D = query.shape
    _, Hkv, L, _ = keys.shape
    G = Hq // Hkv
    pads = _padding(padding, B)
    q = query.to(torch.float64).reshape(B, Hkv, G, D)
    logits = torch.einsum("bkgd,bknd->bkgn", q, keys.to(torch.float64)) / math.sqrt(D)
    valid = torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]  # [B, L]
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None], -math.inf), dim=-1)
    return acc.to(torch.float64) + torch.nan_to_num(probs, nan=0.0).sum(dim=2)


def h2o_scores_reference(acc, start, end, *, q_heads, aggregation="all"):
    """``h2o``: accumulated attention per candidate, averaged over the query heads it sums."""
    Hkv = acc.shape[1]
    cand = acc[:, :, start:end].to(torch.float64)
    if aggregation == "all":
        return cand.sum(dim=1, keepdim=True) / q_heads
    return cand / (q_heads // Hkv)


def snapkv_scores_reference(queries, keys, start, end, *, query_positions, padding=None, aggregation="group",
                            pooling="avg", kernel_size=5):
    """``snapkv``: the window queries' causal attention summed over the window, averaged over each KV
    head's query heads (``group``, SnapKV's per-KV-head selection) or all heads, then pooled."""
    return window_attention_reference(queries, keys, start, end, query_positions=query_positions, padding=padding,
                                      norm="causal", aggregation=aggregation, pooling=pooling,
                                      kernel_size=kernel_size)[0]


def redundancy_reference(keys, *, padding=None, threshold=0.5):
    """R-KV's redundancy of every key, ``[B, Hkv, L]`` float64 (0 at padded positions).

    Per sequence and KV head, over the valid keys ``[padding[b], L)``: cosine similarity of every
    pair of keys (``k / (|k| + 1e-8)``), diagonal zeroed; for each key ``i`` the newest key whose
    similarity exceeds ``threshold`` (the first valid key when there is none, as in the published
    code) has its entry ``(i, j)`` zeroed, so the newest of a group of near-duplicates is spared;
    then the mean over ``i`` of column ``j`` is key ``j``'s redundancy, softmax-normalised over ``j``.
    """
    B, Hkv, L, D = keys.shape
    pads = _padding(padding, B)
    out = torch.zeros(B, Hkv, L, dtype=torch.float64)
    for b in range(B):
        lo = pads[b]
        if lo >= L:
            continue
        k = keys[b, :, lo:, :].to(torch.float64)  # [Hkv, n, D]
        n = k.shape[1]
        kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
        sim = kn @ kn.transpose(-1, -2)  # [Hkv, n, n]
        sim.diagonal(dim1=-2, dim2=-1).zero_()
        idx = torch.arange(n).expand(Hkv, n, n) * (sim > threshold)
        newest = idx.amax(dim=-1)  # [Hkv, n]
        sim.scatter_(-1, newest.unsqueeze(-1), 0.0)
        out[b, :, lo:] = torch.softmax(sim.mean(dim=-2), dim=-1)
    return out


def rkv_scores_reference(queries, keys, start, end, *, padding=None, mix_lambda=0.07, threshold=0.5,
                         aggregation="group", pooling="max", kernel_size=7):
    """``rkv``: ``mix_lambda * importance - (1 - mix_lambda) * redundancy`` per KV head, where the
    importance is the window queries' attention (group logits max-pooled, softmax over every key
    older than the window, mean over queries, pooled along the candidates) and the redundancy is
    ``redundancy_reference`` at the candidates. ``all`` averages the mixed score over KV heads."""
    importance = window_attention_reference(queries, keys, start, end, padding=padding, norm="past",
                                            gqa="max_logits", query_reduce="mean", aggregation="group",
                                            pooling=pooling, kernel_size=kernel_size)[0]
    redundancy = redundancy_reference(keys, padding=padding, threshold=threshold)[:, :, start:end]
    mixed = mix_lambda * importance - (1.0 - mix_lambda) * redundancy
    return mixed.mean(dim=1, keepdim=True) if aggregation == "all" else mixed
