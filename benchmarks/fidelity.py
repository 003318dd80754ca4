"""Fidelity of RPC against the full KV cache, measured on the same inputs (used by notebooks/ablation.ipynb).

The question is how far a compressed cache moves the model away from what it would do with every
token kept. Sampling two free-running generations would mix that with the chaos of divergent
texts, so the comparison is teacher-forced:

1. ``full_kv_reference`` decodes greedily with transformers' DynamicCache in a hand-written loop and
   keeps, for every step, the next-token log-probabilities. It also taps the post-RoPE decode
   queries (through an attention function registered for this purpose) and, at the steps where a
   compression can happen, records how much attention the last R queries of each layer give every
   older generated token ("attention mass", softmax over the candidates as in RPC's own scoring, but
   with the full cache and without pooling).
2. ``teacher_forced`` feeds exactly those tokens, one per step, through an ``RPCCache`` and records
   its log-probabilities, its statistics, its decode time and, through the cache's compression
   hook, the logical positions each compression kept.
3. ``compare`` turns the two into numbers: next-token top-1 agreement and the mean KL divergence
   KL(full || RPC) over the steps after the first compression (earlier steps are identical by
   construction) and over all steps, plus the overlap of the kept positions with the top-k of the
   full-attention mass (k = what RPC keeps), next to the overlap a uniformly random choice of k
   candidates would have in expectation (k / N).

The oracle in (1) scores with the full-KV model's own queries, so after the first compression it
measures "what full attention would have weighed most", not "what RPC's scoring computes": the kept
set is expected to differ from it also because RPC pools its scores over neighbouring positions.

Models are small config-built Qwen2 decoders with random weights (float32, CPU). A random model's
attention is more diffuse than a trained one's; ``ReferenceRun.entropy`` reports the normalized
entropy of the probed attention rows (1.0 = uniform) so the interpretation can say so.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import statistics
import time
from collections import deque

import torch
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rpc_py.api import RPCCache, RPCConfig, compress

__all__ = [
    "ModelSetup",
    "make_model",
    "make_prompts",
    "full_kv_reference",
    "teacher_forced",
    "compare",
    "evaluate",
    "compression_steps",
    "format_table",
    "probes_for",
    "spearman",
]

TAP = "rpc_fidelity_sdpa"


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """A small Qwen2 decoder and the inputs of one ablation. ``init_std`` is the std of the random
    weights: larger values give more peaked attention (0.02, transformers' default, gives an almost
    uniform one at this size)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 512
    vocab: int = 1024
    init_std: float = 0.08
    batch: int = 2
    prompt: int = 64
    new_tokens: int = 512
    seed: int = 0


def make_model(setup: ModelSetup):
    """Float32, sdpa, eval mode, no end-of-sequence token; weights from ``setup.seed``."""
    cfg = transformers.Qwen2Config(
        hidden_size=setup.hidden, num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads, intermediate_size=setup.intermediate, vocab_size=setup.vocab,
        max_position_embeddings=max(4096, 2 * (setup.prompt + setup.new_tokens)), initializer_range=setup.init_std,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(setup.seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(setup: ModelSetup) -> torch.Tensor:
    g = torch.Generator().manual_seed(setup.seed + 1)
    return torch.randint(1, setup.vocab, (setup.batch, setup.prompt), generator=g)


def compression_steps(rpc: RPCConfig, steps: int) -> list[int]:
    """Decode steps (1-based) after whose attention a layer compresses, up to ``steps``."""
    if not rpc.enabled:
        return []
    first = rpc.interval + rpc.window
    return list(range(first, steps + 1, rpc.interval))


def _cache_kwarg(model) -> str:
    # transformers renamed the forward argument past_key_values to cache in 5.2x.
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


# ------------------------------------------------------------------------------ the query tap
class _Tap:
    """Keeps the most recent decode queries of every layer (the attention function below fills it)."""

    active: "_Tap | None" = None

    def __init__(self, depth: int):
        self.rings: dict[int, deque] = {}
        self.depth = depth

    def record(self, layer: int, query: torch.Tensor) -> None:
        ring = self.rings.get(layer)
        if ring is None:
            ring = self.rings[layer] = deque(maxlen=self.depth)
        ring.append(query.detach().clone())

    def last(self, layer: int, count: int) -> torch.Tensor:
        ring = self.rings[layer]
        if len(ring) < count:
            raise ValueError(f"layer {layer}: {len(ring)} decode queries recorded, {count} needed")
        return torch.cat(list(ring)[-count:], dim=2)  # [B, Hq, count, D]


def _tap_attention(module, query, key, value, attention_mask, **kwargs):
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    tap = _Tap.active
    if tap is not None and query.shape[2] == 1:
        tap.record(module.layer_idx, query)
    return out


_registered = False


def _register_tap() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(TAP, _tap_attention)
        AttentionMaskInterface.register(TAP, sdpa_mask)  # transformers builds no mask for unknown names
        _registered = True


# ------------------------------------------------------------------------------ the reference
@dataclasses.dataclass
class ReferenceRun:
    """Greedy full-KV decoding. ``tokens``: [B, new_tokens] generated ids (token 0 from the prefill);
    ``logprobs``: [steps, B, V] float64, row g-1 the prediction after feeding token g-1 at decode
    step g; ``mass[(layer, step, window)]``: [B, Hq, N] attention mass of the last ``window``
    queries over the candidates [Lp, Lp + step - window); ``entropy``: mean normalized entropy of the
    probed attention rows; ``decode_s``: wall time of the decode steps."""

    prompt_length: int
    tokens: torch.Tensor
    logprobs: torch.Tensor
    mass: dict
    entropy: float
    decode_s: float
    kv_bytes_per_token: int

    @property
    def steps(self) -> int:
        return self.logprobs.shape[0]


def full_kv_reference(model, ids: torch.Tensor, new_tokens: int, probes: dict[int, set[int]]) -> ReferenceRun:
    """Greedy decoding with DynamicCache. ``probes`` maps a window R to the decode steps at which
    to record the attention mass of the last R queries (see ``compression_steps``)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens: expected >= 2, got {new_tokens}")
    _register_tap()
    depth = max(probes, default=1)
    tap = _Tap(depth)
    key = _cache_kwarg(model)
    lp = ids.shape[1]
    previous = model.config._attn_implementation
    cache = DynamicCache()
    tokens, logprobs, mass, entropies = [], [], {}, []
    model.set_attn_implementation(TAP)
    _Tap.active = tap
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **{key: cache})
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
            t0 = time.perf_counter()
            for step in range(1, new_tokens):
                out = model(input_ids=tok, use_cache=True, **{key: cache})
                logits = out.logits[:, -1].to(torch.float64)
                logprobs.append(torch.log_softmax(logits, dim=-1))
                tok = logits.argmax(-1, keepdim=True)
                tokens.append(tok)
                for window, steps in probes.items():
                    if step in steps:
                        for layer in range(len(cache.layers)):
                            keys = cache.layers[layer].keys
                            m, h = _attention_mass(tap.last(layer, window), keys[:, :, lp : lp + step - window])
                            mass[(layer, step, window)] = m
                            entropies.append(h)
            decode_s = time.perf_counter() - t0
    finally:
        _Tap.active = None
        model.set_attn_implementation(previous)
    k0 = cache.layers[0].keys
    per_token = 2 * len(cache.layers) * k0.shape[1] * k0.shape[3] * k0.element_size()
    return ReferenceRun(
        prompt_length=lp,
        tokens=torch.cat(tokens, dim=1),
        logprobs=torch.stack(logprobs),
        mass=mass,
        entropy=float(sum(entropies) / len(entropies)) if entropies else float("nan"),
        decode_s=decode_s,
        kv_bytes_per_token=per_token,
    )


def _attention_mass(queries: torch.Tensor, keys: torch.Tensor):
    """Softmax over the candidate keys of every (query, head), summed over the queries: [B, Hq, N];
    and the mean entropy of those rows divided by log N."""
    b, hq, r, d = queries.shape
    hkv, n = keys.shape[1], keys.shape[2]
    q = queries.to(torch.float64).reshape(b, hkv, hq // hkv, r, d)
    logits = torch.einsum("bkgrd,bknd->bkgrn", q, keys.to(torch.float64)) / math.sqrt(d)
    p = torch.softmax(logits, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean() / math.log(n) if n > 1 else torch.tensor(0.0)
    return p.sum(dim=3).reshape(b, hq, n), float(entropy)


# ------------------------------------------------------------------------------ teacher forcing
@dataclasses.dataclass
class ForcedRun:
    """An RPCCache fed the reference tokens. ``kept[(layer, step)]``: [B, A, keep] logical positions
    of the candidates kept by that compression; ``lengths``: physical length (layer 0) after every
    decode step."""

    rpc: RPCConfig
    logprobs: torch.Tensor
    kept: dict
    lengths: list
    decode_s: float
    step_s: list
    stats: object


def teacher_forced(model, ids: torch.Tensor, reference: ReferenceRun, rpc: RPCConfig | None,
                   track_kept: bool = True) -> ForcedRun:
    """Feed ``reference.tokens`` through an RPCCache (``rpc=None``: compression off).

    ``track_kept`` installs the cache's compression hook (which copies the layer's K/V before every
    compression) and follows the logical position of every slot; leave it off for timing."""
    rpc = rpc if rpc is not None else RPCConfig(enabled=False)
    lp = ids.shape[1]
    steps = reference.steps
    cache = RPCCache(model, rpc, capacity=rpc.peak_length(lp, steps + 1))
    key = _cache_kwarg(model)
    logical: dict[int, torch.Tensor] = {}  # per layer: [B, A, L] logical position of every physical slot
    kept: dict = {}
    batch = ids.shape[0]

    def on_compress(event):
        layer = event.layer
        pos = logical[layer]
        idx = event.indices.to(torch.int64)  # [B, A, keep], offsets from event.start
        if pos.shape[1] != idx.shape[1]:
            pos = pos.expand(-1, idx.shape[1], -1)
        cand = pos[:, :, event.start : event.length_before - rpc.window]
        chosen = torch.gather(cand, 2, idx)
        kept[(layer, event.generated)] = chosen
        logical[layer] = torch.cat(
            [pos[:, :, : event.start], chosen, pos[:, :, event.length_before - rpc.window : event.length_before]], dim=2
        )

    if track_kept:
        cache.compression_hook = on_compress
    tokens = reference.tokens
    logprobs, lengths, step_s = [], [], []
    with compress(model, rpc), torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{key: cache})
        for layer in range(cache.num_layers):
            logical[layer] = torch.arange(lp).expand(batch, 1, lp)
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            if track_kept:  # the token fed at step g sits at logical position Lp + g - 1
                for layer in range(cache.num_layers):
                    pos = logical[layer]
                    logical[layer] = torch.cat([pos, torch.full((batch, pos.shape[1], 1), lp + step - 1)], dim=2)
            t_step = time.perf_counter()
            out = model(input_ids=tokens[:, step - 1 : step], use_cache=True, **{key: cache})
            step_s.append(time.perf_counter() - t_step)
            logprobs.append(torch.log_softmax(out.logits[:, -1].to(torch.float64), dim=-1))
            lengths.append(cache.get_physical_length(0))
        decode_s = time.perf_counter() - t0
    stats = cache.stats()
    cache.release()
    return ForcedRun(rpc=rpc, logprobs=torch.stack(logprobs), kept=kept, lengths=lengths, decode_s=decode_s,
                     step_s=step_s, stats=stats)


# ------------------------------------------------------------------------------ metrics
def _aggregate(mass: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hq, N] -> [B, A, N]: mean over all heads (A = 1) or over each KV head's query heads."""
    b, hq, n = mass.shape
    if groups == 1:
        return mass.mean(dim=1, keepdim=True)
    return mass.reshape(b, groups, hq // groups, n).mean(dim=2)


def compare(reference: ReferenceRun, run: ForcedRun, timed: ForcedRun | None = None) -> dict:
    """Fidelity numbers of one teacher-forced run against the reference (see the module docstring).

    ``run`` must have tracked the kept positions; ``timed`` (default ``run``) is the run whose decode
    time and statistics are reported. ``overlap_first`` is the overlap at the first compression
    alone, where RPC and the reference saw identical inputs (it isolates the scoring and pooling)."""
    timed = timed if timed is not None else run
    rpc = run.rpc
    steps = reference.steps
    full, mine = reference.logprobs, run.logprobs
    top1 = (full.argmax(-1) == mine.argmax(-1)).to(torch.float64)  # [steps, B]
    kl = (full.exp() * (full - mine)).sum(-1).clamp_min(0.0)  # [steps, B]; tiny negatives are rounding
    comp = compression_steps(rpc, steps)
    # Row g-1 is decode step g; a compression at step s changes the predictions from step s + 1 on.
    first = comp[0] if comp else steps
    after = slice(first, steps)
    overlap, random_overlap, overlap_first = [], [], []
    lp = reference.prompt_length
    for (layer, step), chosen in run.kept.items():
        m = reference.mass.get((layer, step, rpc.window))
        if m is None:
            continue
        agg = _aggregate(m, chosen.shape[1])  # [B, A, N]
        k = chosen.shape[2]
        if k == 0:
            continue
        oracle = torch.topk(agg, k, dim=-1).indices + lp  # logical positions
        hit = (chosen.unsqueeze(-1) == oracle.unsqueeze(-2)).any(-1).to(torch.float64).mean(-1)  # [B, A]
        overlap.append(float(hit.mean()))
        random_overlap.append(k / agg.shape[-1])
        if step == first:
            overlap_first.append(float(hit.mean()))
    st = timed.stats
    bytes_per_token = reference.kv_bytes_per_token
    batch = full.shape[1]
    peak_len = max([lp] + run.lengths + [_peak_before_compression(rpc, lp, steps)])
    full_peak = lp + steps
    n_after = steps - first
    return {
        "P": rpc.interval if rpc.enabled else None,
        "R": rpc.window if rpc.enabled else None,
        "c": rpc.ratio if rpc.enabled else None,
        "budget": rpc.budget,
        "compressions": st.compressions[0] if st.compressions else 0,
        "peak_cache_len": peak_len,
        "final_cache_len": run.lengths[-1],
        "kv_peak_mib": batch * peak_len * bytes_per_token / 2**20,
        "kv_fraction": peak_len / full_peak,
        "kv_alloc_peak_mib": st.peak_kv_bytes / 2**20,
        # Median step time: robust to the bursts of a shared CPU; the total is kept beside it.
        "decode_tok_s": batch / statistics.median(timed.step_s),
        "decode_tok_s_total": batch * steps / timed.decode_s,
        "compress_ms": 1e3 * st.compress_seconds,
        "top1_after": float(top1[after].mean()) if n_after > 0 else None,
        "kl_after": float(kl[after].mean()) if n_after > 0 else None,
        "top1_all": float(top1.mean()),
        "kl_all": float(kl.mean()),
        "kl_max": float(kl.max()),
        "steps_after": n_after,
        "overlap": sum(overlap) / len(overlap) if overlap else None,
        "overlap_random": sum(random_overlap) / len(random_overlap) if random_overlap else None,
        "overlap_first": sum(overlap_first) / len(overlap_first) if overlap_first else None,
    }


def _peak_before_compression(rpc: RPCConfig, lp: int, steps: int) -> int:
    # lengths are recorded after each step's compression; the cache held P + R generated tokens
    # (plus the kept ones) just before it.
    return rpc.peak_length(lp, steps + 1) if rpc.enabled else lp + steps


def evaluate(model, ids, reference: ReferenceRun, points, progress=None) -> list[dict]:
    """Run every ``(group, label, rpc)`` point teacher-forced and compare it with the reference.
    ``rpc=None`` is the uncompressed rpc_py cache (a sanity row: KL should be ~0)."""
    rows, done = [], {}
    for group, label, rpc in points:
        if rpc in done:  # the same setting listed in two groups: measured once
            row = dict(done[rpc], group=group, label=label)
            rows.append(row)
            continue
        # Timing run first (no hook, no position tracking), then the tracked run for the overlap.
        timed = teacher_forced(model, ids, reference, rpc, track_kept=False)
        run = teacher_forced(model, ids, reference, rpc, track_kept=True) if rpc is not None else timed
        row = {"group": group, "label": label}
        row.update(compare(reference, run, timed))
        row["repeatable"] = bool(torch.equal(run.logprobs, timed.logprobs))
        row["lengths"] = run.lengths
        rows.append(row)
        done[rpc] = row
        if progress is not None:
            progress(row)
    return rows


def probes_for(points, steps: int) -> dict[int, set[int]]:
    """The (window -> steps) at which ``full_kv_reference`` must record attention mass."""
    probes: dict[int, set[int]] = {}
    for _, _, rpc in points:
        if rpc is not None and rpc.enabled:
            probes.setdefault(rpc.window, set()).update(compression_steps(rpc, steps))
    return probes


def format_table(rows, columns) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [list(columns)] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells)


def spearman(xs, ys) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 pairs or no spread."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
