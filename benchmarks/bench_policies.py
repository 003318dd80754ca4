"""How long do the score kernels of the selection policies take, next to RPC's own scoring?

Times on one layer of an RPC-shaped cache (default CPU: batch 2, 28 query / 4 KV heads, head dim 128,
L = prompt + 4096 + window) in the same run and on the same inputs:
  rpc score      rpc_py._C.score (RPC's tuned scoring: softmax over the candidates, mean of heads)
  attn rpc       attn_scores with RPC's settings (same numbers, general kernel)
  attn snapkv    attn_scores, causal window attention, per KV head, avg pooling 5
  attn tova      attn_scores, the newest query only, causal
  attn rkv       attn_scores, past-normalized, max over the group's logits, mean over queries, max pool 7
  redundancy     R-KV's key redundancy over all L keys (O(L^2 D) per head)
  accumulate     one H2O step (KVCache.accumulate's kernel) over all L keys
  fill random    the random policy's scores
Reports the median of --repeats runs in ms; the machine, dtype and thread count are printed and written
to the JSON (default benchmarks/results/bench_policies_<device>.json).

    OMP_NUM_THREADS=2 python benchmarks/bench_policies.py --device cpu
    python benchmarks/bench_policies.py --device cuda
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from rpc_py import _C

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int)
    p.add_argument("--q-heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--candidates", type=int, default=4096)
    p.add_argument("--repeats", type=int)
    p.add_argument("--json")
    a = p.parse_args()
    cuda = a.device == "cuda"
    a.batch = a.batch or (32 if cuda else 2)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.repeats = a.repeats or (20 if cuda else 3)
    a.json = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"bench_policies_{a.device}.json")
    return a


def timed(fn, repeats, cuda):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    a = parse_args()
    cuda = a.device == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    dt = DTYPES[a.dtype]
    B, Hq, Hkv, D, W = a.batch, a.q_heads, a.kv_heads, a.head_dim, a.window
    L = a.prompt + a.candidates + W
    start, end = a.prompt, L - W
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, W, D, generator=g).to(dt).to(dev)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dt).to(dev)
    q1 = q[:, :, -1:].contiguous()
    acc = torch.zeros(B, Hkv, L, device=dev)
    qpos = list(range(L - W, L))
    pad = [0] * B
    s = torch.cuda.current_stream().cuda_stream if cuda else None
    cases = {
        "rpc score": lambda: _C.score(q, k, start, end, kernel_size=7, stream=s),
        "attn rpc": lambda: _C.attn_scores(q, k, start, end, kernel_size=7, stream=s),
        "attn snapkv": lambda: _C.attn_scores(q, k, start, end, query_positions=qpos, padding=pad, norm="causal",
                                              aggregation="group", kernel_size=5, stream=s),
        "attn tova": lambda: _C.attn_scores(q1, k, start, end, query_positions=[L - 1], padding=pad, norm="causal",
                                            stream=s),
        "attn rkv": lambda: _C.attn_scores(q, k, start, end, padding=pad, norm="past", gqa="max_logits",
                                           query_reduce="mean", aggregation="group", pooling="max", kernel_size=7,
                                           stream=s),
        "redundancy": lambda: _C.redundancy(k, padding=pad, stream=s),
        "accumulate": lambda: _C._accumulate(q1, k, acc, padding=pad, stream=s),
        "fill random": lambda: _C.fill_scores("random", B, Hkv, end - start, seed=1,
                                              device="cuda" if cuda else "cpu", stream=s),
    }
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, " \
                                                         f"{os.cpu_count()} cores, OMP_NUM_THREADS={threads}"
    print(f"device {a.device} ({machine}); B={B} Hq={Hq} Hkv={Hkv} D={D} L={L} N={end - start} R={W} {a.dtype}; "
          f"median of {a.repeats}")
    rows = []
    for name, fn in cases.items():
        ms = timed(fn, a.repeats, cuda)
        rows.append({"kernel": name, "ms": ms})
        print(f"  {name:<14s} {ms:10.2f} ms")
    out = dict(device=a.device, machine=machine, threads=threads, dtype=a.dtype, batch=B, q_heads=Hq, kv_heads=Hkv,
               head_dim=D, length=L, candidates=end - start, window=W, repeats=a.repeats, results=rows)
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
