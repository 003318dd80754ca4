"""Real-text fidelity: next-token NLL of long English texts under a compressed KV cache.

The texts are sections of the Python Language Reference that every CPython installation carries
(``pydoc_data.topics``): real technical English, no download. A text's first ``prompt`` tokens are the
protected prompt; every later token is fed one decode step at a time through an ``RPCCache`` (teacher
forcing), so the cache compresses on RPC's schedule exactly as in generation, and the model's
log-probability of the true next token is recorded at every step. Comparing the NLL of the steps
after the first compression with the full-KV NLL of the same steps says how much the evicted tokens
mattered for predicting real text.
"""

from __future__ import annotations

import math
import random

import torch

from rpc_py.api import RPCCache, RPCConfig, compress

__all__ = ["TOPICS", "load_texts", "teacher_forced_nll", "nll_summary", "bootstrap_mean_interval",
           "paired_difference"]

TOPICS = ("execmodel", "compound", "specialnames", "types", "assignment", "comparisons")


def load_texts(tokenizer, count: int, tokens: int, topics=TOPICS) -> list[list[int]]:
    """``count`` token lists of exactly ``tokens`` tokens: the Language Reference topics in ``topics``
    first, then every other topic long enough, in name order (deterministic for a given CPython)."""
    import pydoc_data.topics as pt

    out = []
    for name in list(topics) + sorted(set(pt.topics) - set(topics)):
        ids = tokenizer(pt.topics[name], add_special_tokens=False).input_ids
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == count:
            return out
    raise ValueError(f"only {len(out)} Language Reference topics have {tokens} tokens")


def _cache_kwarg(model) -> str:
    import inspect

    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def teacher_forced_nll(model, ids: torch.Tensor, prompt: int, rpc: RPCConfig | None) -> torch.Tensor:
    """``[B, T - prompt]`` float64 NLL of tokens ``prompt .. T-1`` of ``ids`` ``[B, T]``: the prompt is
    prefilled, then one token per decode step (``rpc=None``: the same cache, no compression)."""
    rpc = rpc if rpc is not None else RPCConfig(enabled=False)
    B, T = ids.shape
    cache = RPCCache(model, rpc, capacity=rpc.peak_length(prompt, T - prompt + 1))
    key = _cache_kwarg(model)
    nll = []
    with compress(model, rpc), torch.no_grad():
        out = model(input_ids=ids[:, :prompt], use_cache=True, **{key: cache})
        for t in range(prompt, T):
            logp = torch.log_softmax(out.logits[:, -1].to(torch.float64), dim=-1)
            nll.append(-logp.gather(1, ids[:, t : t + 1])[:, 0])
            if t + 1 < T:
                out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{key: cache})
    cache.release()
    return torch.stack(nll, dim=1)


def _block_bootstrap(rows, block: int, rounds: int, seed: int):
    """Means of ``rounds`` stratified block-bootstrap resamples of per-text token series ``rows``:
    each text's blocks of ``block`` neighbouring tokens are resampled within that text (a block never
    straddles two texts, and every text keeps its weight)."""
    per_text = [[r[i : i + block] for i in range(0, len(r), block)] for r in rows if len(r)]
    total = sum(len(r) for r in rows)
    rng = random.Random(seed)
    means = []
    for _ in range(rounds):
        acc = 0.0
        for blocks in per_text:
            for _ in blocks:
                acc += sum(blocks[rng.randrange(len(blocks))])
        means.append(acc / total)
    return means


def bootstrap_mean_interval(rows, block: int = 32, rounds: int = 2000, seed: int = 0):
    """95% interval of the mean over every token of ``rows`` (one token series per text; a flat list is
    one text) by a block bootstrap within each text (neighbouring tokens are not independent)."""
    rows = [list(r) for r in rows] if rows and isinstance(rows[0], (list, tuple)) else [list(rows)]
    means = sorted(_block_bootstrap(rows, block, rounds, seed))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def nll_summary(nll: torch.Tensor, full: torch.Tensor, first_step: int) -> dict:
    """Mean NLL after the first compression (steps ``first_step`` on), its increase over full KV
    (paired per token) and a 95% interval of that increase (block bootstrap within each text)."""
    after = nll[:, first_step:]
    ref = full[:, first_step:]
    diff = (after - ref).tolist() if after.numel() else []
    lo, hi = bootstrap_mean_interval(diff) if diff else (math.nan, math.nan)
    return {
        "nll_after": float(after.mean()) if after.numel() else math.nan,
        "nll_full_after": float(ref.mean()) if ref.numel() else math.nan,
        "delta_nll": float(after.mean() - ref.mean()) if after.numel() else math.nan,
        "delta_ci95": [lo, hi],
        "tokens_after": int(after.numel()),
        "texts": int(after.shape[0]),
    }


def paired_difference(nll_a, nll_b, first_step: int, rounds: int = 4000, seed: int = 0) -> dict:
    """Policy A vs policy B on the same tokens: the mean per-token NLL difference A - B after the first
    compression, its 95% interval and a two-sided bootstrap p-value (block bootstrap within each text;
    ``(k + 1) / (rounds + 1)`` per tail, so the smallest reportable p is ``2 / (rounds + 1)``)."""
    a = torch.as_tensor(nll_a, dtype=torch.float64)[:, first_step:]
    b = torch.as_tensor(nll_b, dtype=torch.float64)[:, first_step:]
    diff = (a - b).tolist()
    means = sorted(_block_bootstrap(diff, 32, rounds, seed))
    mean = float((a - b).mean())
    below = sum(1 for m in means if m <= 0)
    above = sum(1 for m in means if m >= 0)
    # two-sided, with the add-one correction: never 0, at least 2 / (rounds + 1) (the test's resolution)
    p = min(1.0, 2 * (min(below, above) + 1) / (rounds + 1))
    return {"mean_diff": mean, "ci95": [means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]],
            "p_bootstrap": p, "rounds": rounds, "tokens": int(a.numel()), "texts": int(a.shape[0])}
