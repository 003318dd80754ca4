"""What RPC buys in a serving engine: sequences in flight, KV blocks in use, output tok/s, TTFT.

Two vLLM engines run one after the other in the same process, on the same model, the same KV pool
(``--blocks`` blocks of ``--block-size`` tokens, ``num_gpu_blocks_override``) and the same stream of
requests: ``plain`` (vLLM as installed, no compression) and ``rpc`` (``rpc_py.vllm`` with
``--interval/--window/--ratio``). Every request is greedy with ``ignore_eos``, so every request
generates exactly ``--output`` tokens in both engines and both do the same useful work. Requests
arrive ``--arrival-gap`` seconds apart (0: all queued at the start).

The engines are driven step by step (``LLMEngine.step``) with the engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so after every step the script reads the scheduler itself:
requests running and waiting, blocks in use. Measured per engine: wall time from the first arrival to
the last token, output tokens per second over that time, the most and the mean number of running
requests, blocks in use over time, each request's time to first token (arrival to first output token)
and preemptions. The JSON (``--json``) is rewritten after each engine; a plot of running requests and
blocks in use over time goes next to it.

    python benchmarks/bench_vllm.py                       # SmolLM2-135M (rpc_py.smollm2), CPU
    python benchmarks/bench_vllm.py --model /models/DeepSeek-R1-Distill-Qwen-7B --blocks 2000 ...
    python benchmarks/bench_vllm.py --shape r1-7b --blocks 2000 ...   # R1-7B shape, random weights

On a GPU build of vLLM the plain engine runs; ``rpc_py.vllm`` serves vLLM's CPU build only in this
release and says so (the ``rpc`` row then records the refusal instead of a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process

# R1-Distill-Qwen-7B's shape (Qwen2), for --shape with vLLM's random ("dummy") weights.
R1_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
             rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_act="silu",
             tie_word_embeddings=False, use_sliding_window=False, sliding_window=None, torch_dtype="bfloat16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local model folder (default: SmolLM2-135M from rpc_py.smollm2)")
    src.add_argument("--shape", choices=["r1-7b"], help="R1-7B's shape with vLLM's random weights")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output", type=int, default=2048, help="generated tokens per request")
    p.add_argument("--arrival-gap", type=float, default=0.0, help="seconds between arrivals")
    p.add_argument("--blocks", type=int, default=280, help="KV pool size in blocks (same for both engines)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--interval", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--policy", default="rpc")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (VLLM_CPU_OMP_THREADS_BIND / torch)")
    p.add_argument("--only", choices=["plain", "rpc"], help="run one engine only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--replot", metavar="JSON", help="draw the plot and print the table of a results file, then exit")
    return p.parse_args(argv)


def model_folder(args, tmp):
    if args.model:
        return args.model, {}
    if args.shape:
        folder = os.path.join(tmp, args.shape)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(R1_7B, f)
        return folder, {"load_format": "dummy"}
    from rpc_py import smollm2

    folder = smollm2.cache_folder()
    if not os.path.isdir(folder):
        smollm2.load()  # converts the GGUF once
    return folder, {}


def prompts(n, length, vocab, seed):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab, 30000)) for _ in range(length)] for _ in range(n)]


def run_engine(name, args, folder, extra, requests):
    import gc

    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kw = dict(model=folder, dtype=args.dtype, skip_tokenizer_init=True, seed=args.seed,
              max_model_len=args.prompt + args.output + 8, block_size=args.block_size,
              num_gpu_blocks_override=args.blocks, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=True, **extra)
    if name == "rpc":
        from rpc_py import RPCConfig
        from rpc_py.vllm import engine_config

        kw["additional_config"] = engine_config(RPCConfig(interval=args.interval, window=args.window,
                                                          ratio=args.ratio, policy=args.policy))
    row = {"engine": name}
    t0 = time.perf_counter()
    try:
        llm = LLM(**kw)
    except NotImplementedError as e:  # e.g. rpc_py.vllm on a GPU build
        row["refused"] = str(e)
        return row
    row["startup_s"] = time.perf_counter() - t0
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    total_blocks = pool.num_gpu_blocks - 1  # one null block
    preempted = []
    original = sched._preempt_request

    def spy(request, *a, **k):
        preempted.append(request.request_id)
        return original(request, *a, **k)

    sched._preempt_request = spy
    params = SamplingParams(temperature=0.0, max_tokens=args.output, min_tokens=args.output, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    pending = list(enumerate(requests))
    arrival, first, tokens = {}, {}, {}
    timeline = []
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and (args.arrival_gap <= 0 or pending[0][0] * args.arrival_gap <= now):
            i, p = pending.pop(0)
            rid = f"{name}-{i}"
            engine.add_request(rid, {"prompt_token_ids": p}, params)
            arrival[rid] = time.perf_counter() - start
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, args.arrival_gap))
            continue
        outs = engine.step()
        t = time.perf_counter() - start
        new = 0
        for out in outs:
            n = len(out.outputs[0].token_ids)
            if n and out.request_id not in first:
                first[out.request_id] = t
            tokens[out.request_id] = tokens.get(out.request_id, 0) + n
            new += n
        timeline.append((round(t, 4), len(sched.running), len(sched.waiting),
                         total_blocks - pool.get_num_free_blocks(), new))
    wall = time.perf_counter() - start
    produced = sum(tokens.values())
    if any(v != args.output for v in tokens.values()) or len(tokens) != len(requests):
        raise RuntimeError(f"{name}: expected {args.output} tokens from each of {len(requests)} requests, got {tokens}")
    ttft = [first[r] - arrival[r] for r in arrival]
    running = [s[1] for s in timeline]
    blocks = [s[3] for s in timeline]
    spans = [b[0] - a[0] for a, b in zip([(0.0,)] + timeline[:-1], timeline)]  # each step's wall time
    row.update({
        "wall_s": wall, "output_tokens": produced, "output_tok_s": produced / wall, "steps": len(timeline),
        "max_running": max(running), "mean_running": statistics.fmean(running),
        "time_mean_running": sum(r * d for r, d in zip(running, spans)) / wall,
        "time_mean_blocks_in_use": sum(b * d for b, d in zip(blocks, spans)) / wall,
        "max_blocks_in_use": max(blocks), "mean_blocks_in_use": statistics.fmean(blocks), "pool_blocks": total_blocks,
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft),
        "preemptions": len(preempted), "rpc_blocks_returned": getattr(sched, "rpc_blocks_returned", None),
        "timeline": {"t": [s[0] for s in timeline], "running": running, "waiting": [s[2] for s in timeline],
                     "blocks_in_use": blocks},
    })
    del engine, sched, pool, llm
    gc.collect()
    return row


def plot(result, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed here: no plot (python benchmarks/bench_vllm.py --replot JSON "
              "draws it from the JSON anywhere matplotlib is)", file=sys.stderr)
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for row in result["engines"]:
        if "timeline" not in row:
            continue
        tl = row["timeline"]
        label = f"{row['engine']} ({row['output_tok_s']:.0f} tok/s)"
        a.step(tl["t"], tl["running"], where="post", label=label)
        b.step(tl["t"], tl["blocks_in_use"], where="post", label=label)
    a.set(xlabel="seconds", ylabel="requests running", title="sequences in flight")
    b.set(xlabel="seconds", ylabel="KV blocks in use", title=f"KV pool: {result['settings']['blocks']} blocks")
    for ax in (a, b):
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(result):
    print(f"\n{result['title']}")
    print(f"{'engine':<7} {'tok/s':>8} {'wall s':>8} {'max run':>8} {'mean run':>9} {'mean blk':>9} "
          f"{'TTFT mean':>10} {'TTFT max':>9} {'preempt':>8}")
    for r in result["engines"]:
        if "refused" in r:
            print(f"{r['engine']:<7} refused: {r['refused']}")
            continue
        print(f"{r['engine']:<7} {r['output_tok_s']:8.1f} {r['wall_s']:8.1f} {r['max_running']:8d} "
              f"{r['time_mean_running']:9.2f} {r['time_mean_blocks_in_use']:9.1f} {r['ttft_mean_s']:10.2f} "
              f"{r['ttft_max_s']:9.2f} {r['preemptions']:8d}")
    print("(mean run / mean blk: averaged over wall time)")
    ratio = result.get("rpc_over_plain")
    if ratio:
        print("rpc / plain: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        print(f"plot: {plot(result, os.path.splitext(args.replot)[0] + '.png')}")
        print_table(result)
        return result
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    import torch
    import vllm

    import rpc_py
    from rpc_py._report import cpu_name

    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        folder, extra = model_folder(args, tmp)
        with open(os.path.join(folder, "config.json")) as f:
            vocab = json.load(f).get("vocab_size", 32000)
        requests = prompts(args.requests, args.prompt, vocab, args.seed)
        device = torch.cuda.get_device_name(0) if on_gpu else cpu_name()
        result = {
            "benchmark": "bench_vllm", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "machine": {"device": device, "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                        "threads": args.threads or torch.get_num_threads()},
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "rpc_py": rpc_py.__version__},
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)} | {"model_folder": folder},
            "title": (f"vLLM {vllm.__version__}, {os.path.basename(folder.rstrip('/'))}, {args.requests} requests x "
                      f"({args.prompt} + {args.output}) tokens, pool {args.blocks} x {args.block_size} tokens, RPC "
                      f"P={args.interval} R={args.window} c={args.ratio}; {device}"),
            "engines": [],
        }
        for name in ("plain", "rpc"):
            if args.only and args.only != name:
                continue
            result["engines"].append(run_engine(name, args, folder, extra, requests))
            rows = {r["engine"]: r for r in result["engines"] if "output_tok_s" in r}
            if "plain" in rows and "rpc" in rows:
                result["rpc_over_plain"] = {k: rows["rpc"][k] / rows["plain"][k] for k in
                                            ("output_tok_s", "time_mean_running", "ttft_mean_s")}
            if args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
        if args.json:
            png = plot(result, os.path.splitext(args.json)[0] + ".png")
            if png:
                print(f"plot: {png}")
    print_table(result)
    return result


if __name__ == "__main__":
    main()
