"""Accuracy harness: pass@1 of a local model on jsonl problems, with and without compression.

``python -m rpc_py.accuracy --model PATH --problems FILE.jsonl --setting full --setting P=4096,R=32,c=4``
runs every problem under every setting (``full`` = rpc_py's cache with compression off; anything else
is an ``RPCConfig``, any selection policy included), ``--samples`` times each (greedy by default,
seeded sampling with ``--sample``), and writes a JSON file with the summary per setting and one record
per generation (prediction, correctness, trace length, compressions, peak KV fraction), then prints a
table. The same command serves the project's two built-in models (``--model tracemodel``,
``--model smollm2``) and a user's own checkpoint folder (an R1-Distill or QwQ on a GPU machine).

Problems are JSON objects with ``problem`` (the prompt text) and ``answer``; other fields are kept in
the records. When the tokenizer has a chat template the problem becomes one user turn of it (with
``--system`` as the system turn), otherwise the text is tokenized as is. The answer is the last
``\\boxed{...}`` in the generation, else the last ``answer: X``; it counts as correct when it equals the
reference after normalisation (whitespace, ``$``, a trailing period; numbers compared as numbers).

Batches are left-padded and built from problems of similar prompt length. Memory is reported as the
peak of the physical KV length over the generation divided by the full-KV peak (prompt + generated
tokens of that sample), from the RPC schedule (``RPCConfig.peak_length``), which the cache follows
exactly (tested); the cache's own measured statistics of each batch are recorded too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import time

__all__ = [
    "Setting",
    "parse_setting",
    "load_problems",
    "extract_answer",
    "is_correct",
    "evaluate",
    "summarize",
    "format_table",
    "wilson_interval",
    "mcnemar_exact",
    "holm",
    "main",
]


# ------------------------------------------------------------------ problems and answers
def load_problems(path: str) -> list[dict]:
    """Problems from a jsonl file: one object per line with at least ``problem`` and ``answer``."""
    problems = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or "problem" not in obj or "answer" not in obj:
                raise ValueError(f"{path}:{n}: expected an object with 'problem' and 'answer'")
            problems.append(obj)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    while start >= 0:
        i = text.find("{", start)
        if i < 0:
            break
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        start = text.rfind("\\boxed", 0, start)  # unbalanced: try an earlier one
    return None


_ANSWER_RE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*\**\s*([^\n]*)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The last ``\\boxed{...}`` in ``text``, else the text after the last ``answer:`` (up to the end of
    its line; for a word-level trace ``answer : 7`` that is ``7``), else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    found = _ANSWER_RE.findall(text)
    if found:
        value = found[-1].strip()
        return value.split()[0].rstrip(".,;") if value else None
    return None


def _normalize(x) -> str:
    s = str(x).strip().strip("$").strip()
    s = s.rstrip(".").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    return s


def is_correct(prediction, answer) -> bool:
    """Normalised string equality, or numeric equality when both parse as numbers."""
    if prediction is None:
        return False
    p, a = _normalize(prediction), _normalize(answer)
    if p == a:
        return True
    try:
        return math.isclose(float(p.replace(",", "")), float(a.replace(",", "")), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return False


# ------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to run the model: ``rpc=None`` is the full KV cache (compression off)."""

    name: str
    rpc: object | None = None  # RPCConfig


_KEYS = {"P": "interval", "R": "window", "c": "ratio", "interval": "interval", "window": "window", "ratio": "ratio",
         "budget": "budget", "policy": "policy", "pooling": "pooling", "kernel_size": "kernel_size",
         "aggregation": "aggregation"}


def parse_setting(text: str) -> Setting:
    """``full`` or ``[name=]key=value,...`` with keys P/interval, R/window, c/ratio, budget, policy,
    pooling, kernel_size, aggregation; e.g. ``P=128,R=16,c=4`` or ``recent:P=128,R=16,c=4,policy=recent``."""
    from .config import RPCConfig

    text = text.strip()
    if text in ("full", "none", "off"):
        return Setting("full", None)
    name = None
    if ":" in text:
        name, text = text.split(":", 1)
    kwargs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"setting {text!r}: expected key=value, got {part!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in _KEYS:
            raise ValueError(f"setting {text!r}: unknown key {key!r} (known: {sorted(set(_KEYS))})")
        field = _KEYS[key]
        if field in ("interval", "window", "ratio", "kernel_size"):
            kwargs[field] = int(value)
        elif field == "budget":
            kwargs[field] = None if value.lower() == "none" else int(value)
        else:
            kwargs[field] = value
    rpc = RPCConfig(**kwargs)
    return Setting(name or _default_name(rpc), rpc)


def _default_name(rpc) -> str:
    policy = getattr(rpc, "policy", None)
    policy_name = getattr(policy, "name", policy) or "rpc"
    budget = "" if rpc.budget is None else f",budget={rpc.budget}"
    return f"{policy_name}:P={rpc.interval},R={rpc.window},c={rpc.ratio}{budget}"


# ------------------------------------------------------------------ running
def _prompt_ids(tokenizer, problem: dict, system: str | None):
    text = problem["problem"]
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text).input_ids)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def evaluate(model, tokenizer, problems, settings, *, samples: int = 1, do_sample: bool = False,
             temperature: float = 0.6, top_p: float = 0.95, seed: int = 0, batch_size: int = 8,
             max_new_tokens: int = 4096, system: str | None = None, progress: bool = True,
             generate_kwargs: dict | None = None) -> dict:
    """Run every problem under every setting; returns ``{"summary": [...], "records": [...], "meta": {...}}``.

    ``settings``: a list of ``Setting`` (or strings for ``parse_setting``). Greedy decoding gives one
    deterministic sample; with ``do_sample=True`` sample ``i`` of a batch is drawn after
    ``torch.manual_seed(seed + 1000003 * i + batch)``, the same seeds under every setting.
    """
    import torch

    from .hf.generate import generate as rpc_generate
    from .hf.generate import last_cache

    settings = [parse_setting(s) if isinstance(s, str) else s for s in settings]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"settings: names must be unique, got {names}")
    if samples < 1:
        raise ValueError(f"samples: expected >= 1, got {samples}")
    if not do_sample and samples > 1:
        raise ValueError("samples > 1 needs do_sample=True (greedy decoding gives the same sample every time)")
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = next(iter(eos_ids)) if eos_ids else 0

    prompts = [_prompt_ids(tokenizer, p, system) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: (len(prompts[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    records = []
    bar = _progress(len(settings) * samples * len(batches), progress, "accuracy")
    t_start = time.perf_counter()
    batch_stats = []
    for setting in settings:
        for sample in range(samples):
            for bi, batch in enumerate(batches):
                width = max(len(prompts[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(prompts[i])
                    ids[row, width - n :] = torch.tensor(prompts[i])
                    mask[row, width - n :] = 1
                ids, mask = ids.to(device), mask.to(device)
                kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id)
                if do_sample:
                    kwargs.update(temperature=temperature, top_p=top_p)
                    torch.manual_seed(seed + 1000003 * sample + bi)
                else:
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                kwargs.update(generate_kwargs or {})
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = rpc_generate(model, ids, attention_mask=mask, rpc=setting.rpc, **kwargs)
                seconds = time.perf_counter() - t0
                sequences = out.sequences if hasattr(out, "sequences") else out
                new = sequences[:, width:].cpu()
                stats = last_cache().stats()
                batch_stats.append({"setting": setting.name, "sample": sample, "batch": bi, "seconds": seconds,
                                    "generated": int(new.shape[1]), "compressions_layer0": stats.compressions[0],
                                    "peak_kv_bytes": stats.peak_kv_bytes})
                for row, i in enumerate(batch):
                    tokens = new[row].tolist()
                    length = len(tokens)
                    finished = False
                    for j, t in enumerate(tokens):
                        if t in eos_ids:
                            length, finished = j + 1, True
                            break
                    text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
                    prediction = extract_answer(text)
                    prompt_len = len(prompts[i])
                    if setting.rpc is None or not setting.rpc.enabled:
                        peak, compressions = prompt_len + length, 0
                    else:
                        peak = setting.rpc.peak_length(prompt_len, length)
                        compressions = setting.rpc.compressions_after(max(length - 1, 0))
                    extra = {k: v for k, v in problems[i].items() if k not in ("problem", "answer")}
                    records.append({
                        "setting": setting.name, "problem": i, "sample": sample, "answer": str(problems[i]["answer"]),
                        "prediction": prediction, "correct": is_correct(prediction, problems[i]["answer"]),
                        "prompt_tokens": prompt_len, "trace_tokens": length, "finished": finished,
                        "compressions": compressions, "peak_kv_tokens": peak,
                        "full_kv_tokens": prompt_len + length, "peak_kv_fraction": peak / (prompt_len + length),
                        **({"extra": extra} if extra else {}),
                    })
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    meta = {
        "model": getattr(model.config, "_name_or_path", type(model).__name__), "problems": len(problems),
        "samples": samples, "do_sample": do_sample, "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None, "seed": seed, "batch_size": batch_size,
        "max_new_tokens": max_new_tokens, "device": str(device), "seconds": time.perf_counter() - t_start,
        "settings": {s.name: (repr(s.rpc) if s.rpc is not None else "full KV") for s in settings},
        "torch_threads": torch.get_num_threads(),
    }
    return {"meta": meta, "summary": summarize(records, names, samples), "records": records, "batches": batch_stats}


# ------------------------------------------------------------------ statistics
def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Analytically the interval contains p and ends at exactly 1 when k == n (0 when k == 0); in
    # floating point the bound can land an ulp inside, which plotting code reads as a negative error.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of paired outcomes from the discordant counts: ``b`` pairs where
    only the first setting is right, ``c`` where only the second is (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (family-wise error rate), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _bootstrap_interval(per_problem: list[float], seed: int = 0, rounds: int = 2000) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(per_problem)
    means = sorted(sum(per_problem[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return (means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1])


def summarize(records: list[dict], names: list[str] | None = None, samples: int = 1) -> list[dict]:
    """Per setting: pass@1 with a 95% interval (Wilson for one sample per problem, a bootstrap over
    problems otherwise), mean trace length, compressions and peak KV fraction."""
    names = names or list(dict.fromkeys(r["setting"] for r in records))
    out = []
    for name in names:
        rows = [r for r in records if r["setting"] == name]
        if not rows:
            continue
        k = sum(r["correct"] for r in rows)
        n = len(rows)
        if samples == 1:
            lo, hi = wilson_interval(k, n)
            method = "wilson"
        else:
            by_problem: dict = {}
            for r in rows:
                by_problem.setdefault(r["problem"], []).append(r["correct"])
            lo, hi = _bootstrap_interval([sum(v) / len(v) for v in by_problem.values()])
            method = "bootstrap over problems"
        out.append({
            "setting": name, "n": n, "correct": k, "pass@1": k / n, "ci95": [lo, hi], "ci_method": method,
            "mean_trace_tokens": sum(r["trace_tokens"] for r in rows) / n,
            "finished": sum(r["finished"] for r in rows) / n,
            "mean_compressions": sum(r["compressions"] for r in rows) / n,
            "mean_peak_kv_fraction": sum(r["peak_kv_fraction"] for r in rows) / n,
        })
    return out


def format_table(summary: list[dict]) -> str:
    head = f"{'setting':<40} {'n':>5} {'pass@1':>7} {'95% CI':>15} {'trace':>7} {'compr.':>6} {'peak KV':>7}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lo, hi = s["ci95"]
        lines.append(f"{s['setting']:<40} {s['n']:>5} {s['pass@1']:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
                     f"{s['mean_trace_tokens']:>7.0f} {s['mean_compressions']:>6.1f} {s['mean_peak_kv_fraction']:>7.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def _load_model(spec: str, dtype: str, device: str):
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if spec == "tracemodel":
        from .tracemodel import load

        model, tok = load(dtype=torch_dtype)
    elif spec == "smollm2":
        from .smollm2 import load

        model, tok = load(dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, attn_implementation="sdpa",
                                                     local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(spec, padding_side="left", local_files_only=True)
    tok.padding_side = "left"
    return model.to(device), tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpc_py.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local checkpoint folder, or 'tracemodel' / 'smollm2'")
    p.add_argument("--problems", help="jsonl file of {'problem', 'answer'} (default with --model tracemodel: "
                                      "--count held-out loop-trace problems)")
    p.add_argument("--count", type=int, default=200, help="loop-trace problems to generate (tracemodel)")
    p.add_argument("--trace-tokens", type=int, default=None, help="loop-trace length (tracemodel; default: the "
                                                                  "model's evaluation spec)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N problems")
    p.add_argument("--setting", action="append", default=None,
                   help="'full' or e.g. 'P=128,R=16,c=4[,budget=64][,policy=recent]'; repeatable")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--system", default=None, help="system turn for chat templates")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _load_model(args.model, args.dtype, args.device)
    if args.problems:
        problems = load_problems(args.problems)
    elif args.model == "tracemodel":
        from .tracemodel import heldout_problems

        problems = heldout_problems(args.count, trace_tokens=args.trace_tokens)
    else:
        p.error("--problems is required unless --model tracemodel")
    if args.limit:
        problems = problems[: args.limit]
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = 4096 if args.model != "tracemodel" else _tracemodel_budget(problems, tok)
    settings = [parse_setting(s) for s in (args.setting or ["full", "P=4096,R=32,c=4"])]
    result = evaluate(model, tok, problems, settings, samples=args.samples, do_sample=args.sample,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                      max_new_tokens=max_new, system=args.system, progress=not args.no_progress)
    result["meta"]["command"] = "python -m rpc_py.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(result["summary"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


def _tracemodel_budget(problems, tokenizer) -> int:
    from .tracemodel.task import TaskSpec, trace_length

    longest = max(int(p.get("iterations", 1)) for p in problems)
    return trace_length(TaskSpec(), longest) + 16


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
