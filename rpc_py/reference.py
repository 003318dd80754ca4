"""Pure-torch oracle of one RPC compression (docs/algorithm.md, steps 1-9).

Everything here is written for reading, not speed: float64 throughout, one step per line, no code
shared with the C/CUDA kernels. The tests compare the kernels against these functions.

Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv query heads per KV head), R selector
queries, D head dim, L cached tokens, candidates are cache positions [start, end), N = end - start.
A is the number of index sets per sequence: 1 for ``aggregation="all"``, Hkv for ``"group"``.

``public_algorithm_reference`` is different: it mimics the way the public RPC code computes the same
thing (input-dtype logits, repeated K, materialized logits, ``torch.topk``). It is the benchmark
baseline, not an oracle.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "score_reference",
    "select_reference",
    "compact_reference",
    "compress_reference",
    "public_algorithm_reference",
]


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def score_reference(queries, keys, start, end, aggregation="all", pooling="avg", kernel_size=7):
    """Steps 3-7: scores of the candidate keys ``[start, end)``.

    queries: [B, Hq, R, D]; keys: [B, Hkv, L, D]. Returns ``(pooled, raw)``, both float64
    [B, A, N]: ``raw`` is the head-aggregated sum over queries of the softmax probabilities,
    ``pooled`` the same after 1-D pooling along N (stride 1, padding kernel_size // 2).
    """
    _check_choice("aggregation", aggregation, ("all", "group"))
    _check_choice("pooling", pooling, ("avg", "max"))
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd integer >= 1, got {kernel_size}")
    B, Hq, R, D = queries.shape
    Hkv = keys.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"keys: {Hkv} KV heads do not divide {Hq} query heads")
    G = Hq // Hkv
    if not 0 <= start < end <= keys.shape[2]:
        raise ValueError(f"start, end: expected 0 <= start < end <= {keys.shape[2]}, got {start}, {end}")

    q = queries.to(torch.float64)
    k = keys[:, :, start:end, :].to(torch.float64)  # [B, Hkv, N, D], the candidates only

    # Step 3: GQA without repeating K: view the query heads as [Hkv, G] so that head h = kv * G + g.
    q = q.reshape(B, Hkv, G, R, D)
    logits = torch.einsum("bkgrd,bknd->bkgrn", q, k) / math.sqrt(D)  # [B, Hkv, G, R, N]

    # Step 4: softmax over the candidates only.
    probs = torch.softmax(logits, dim=-1)

    # Step 5: sum over the R selector queries.
    per_head = probs.sum(dim=3)  # [B, Hkv, G, N]

    # Step 6: mean over all query heads, or over each KV head's G query heads.
    if aggregation == "all":
        raw = per_head.reshape(B, Hq, -1).mean(dim=1, keepdim=True)  # [B, 1, N]
    else:
        raw = per_head.mean(dim=2)  # [B, Hkv, N]

    # Step 7: pooling along N.
    pooled = _pool(raw, pooling, kernel_size)
    return pooled, raw


def _pool(raw, pooling, kernel_size):
    B, A, N = raw.shape
    flat = raw.reshape(B * A, 1, N)
    pad = kernel_size // 2
    if pooling == "avg":
        # count_include_pad=True: the zero padding is counted, so edge scores are damped.
        out = torch.nn.functional.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=True)
    else:
        # max_pool1d pads with -inf, i.e. padding never wins.
        out = torch.nn.functional.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    return out.reshape(B, A, N)


def select_reference(scores, keep):
    """Step 8: per row of ``scores`` [B, A, N], the offsets of the top ``keep`` scores.

    Ranking is by score descending, ties to the lower index, NaN below every number. Returns int64
    [B, A, keep], sorted ascending.
    """
    N = scores.shape[-1]
    if not 0 <= keep <= N:
        raise ValueError(f"keep: expected 0 <= keep <= {N}, got {keep}")
    s = scores.to(torch.float64)
    s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
    # A stable sort of -score keeps equal scores in index order: ties go to the lower index. NaN was
    # mapped to -inf above; to keep NaN strictly below a real -inf, sort by NaN-ness first (stable).
    nan_last = torch.isnan(scores).to(torch.int64)
    order = torch.sort(-s, dim=-1, stable=True).indices
    order = torch.gather(order, -1, torch.sort(torch.gather(nan_last, -1, order), dim=-1, stable=True).indices)
    kept = order[..., :keep]
    return torch.sort(kept, dim=-1).values


def compact_reference(keys, values, indices, start, end):
    """Step 9 as a gather: returns new (keys, values) = prefix [0, start) + kept candidates + window [end, L).

    indices: int64 [B, 1 or H, keep], offsets from ``start``. The inputs are not modified.
    """
    B, H, L, D = keys.shape
    if indices.shape[1] == 1:
        indices = indices.expand(B, H, indices.shape[2])
    positions = torch.cat(
        [
            torch.arange(start, device=keys.device).expand(B, H, start),
            indices.to(keys.device) + start,
            torch.arange(end, L, device=keys.device).expand(B, H, L - end),
        ],
        dim=-1,
    )
    gather_index = positions.unsqueeze(-1).expand(B, H, positions.shape[-1], D)
    return torch.gather(keys, 2, gather_index), torch.gather(values, 2, gather_index)


def compress_reference(queries, keys, values, start, keep, window, aggregation="all", pooling="avg",
                       kernel_size=7):
    """Steps 1-9 end to end on one layer.

    queries: the R selector queries [B, Hq, R, D]; keys, values: [B, Hkv, L, D]; candidates are
    [start, L - window). Returns ``(new_keys, new_values, indices, pooled_scores)``.
    """
    L = keys.shape[2]
    end = L - window
    pooled, _ = score_reference(queries, keys, start, end, aggregation, pooling, kernel_size)
    indices = select_reference(pooled, keep)
    new_keys, new_values = compact_reference(keys, values, indices, start, end)
    return new_keys, new_values, indices, pooled


def public_algorithm_reference(queries, keys, values, start, keep, window, aggregation="all", pooling="avg",
                               kernel_size=7):
    """Benchmark baseline: the compression computed the way the public RPC code does it.

    Written from the algorithm description, in that code path's style:
      * logits in the input dtype (bf16 on GPU): ``q @ k^T`` against K repeated G times, over all L
        cached tokens, materializing [B, Hq, R, L];
      * softmax (float32) over the candidate columns only, sum over queries, mean over heads;
      * pooling, then ``torch.topk`` and a sort of the kept indices;
      * new K/V built by ``torch.gather`` + ``torch.cat`` (fresh tensors, not in place).

    Known quirks kept on purpose because they are part of what is timed: the full-length logits
    (prompt and window columns are computed and then dropped), the G-fold repeated K, low-precision
    logits (which can reorder near-ties), and ``torch.topk`` tie order, which is unspecified. The
    public code's other defects (duplicated current query in the window, scoring left padding) are
    not reproduced. Returns ``(new_keys, new_values, indices)``.
    """
    B, Hq, R, D = queries.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    L = keys.shape[2]
    end = L - window
    k_rep = keys.repeat_interleave(G, dim=1)  # [B, Hq, L, D]
    logits = torch.matmul(queries, k_rep.transpose(-1, -2)) / math.sqrt(D)  # [B, Hq, R, L]
    probs = torch.softmax(logits[..., start:end].float(), dim=-1)
    scores = probs.sum(dim=2)  # [B, Hq, N]
    if aggregation == "all":
        scores = scores.mean(dim=1, keepdim=True)
    else:
        scores = scores.reshape(B, Hkv, G, -1).mean(dim=2)
    pad = kernel_size // 2
    if pooling == "avg":
        scores = torch.nn.functional.avg_pool1d(scores, kernel_size, stride=1, padding=pad)
    else:
        scores = torch.nn.functional.max_pool1d(scores, kernel_size, stride=1, padding=pad)
    indices = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, A, keep]
    A = indices.shape[1]
    gather_index = (indices + start).unsqueeze(-1).expand(B, A, keep, D)
    if A == 1:
        gather_index = gather_index.expand(B, Hkv, keep, D)
    kept_k = torch.gather(keys, 2, gather_index)
    kept_v = torch.gather(values, 2, gather_index)
    new_keys = torch.cat([keys[:, :, :start], kept_k, keys[:, :, end:]], dim=2)
    new_values = torch.cat([values[:, :, :start], kept_v, values[:, :, end:]], dim=2)
    return new_keys, new_values, indices
