"""How long does one RPC compression of one layer take?

Times, in the same run and on the same inputs:
  rpc_py      KVCache.compress of one layer: score + select + compact in place, scratch reused, the
              kept indices written into a torch tensor (indices_out), exactly as RPCCache calls it (on
              CUDA rpc_py allocates nothing and nothing syncs),
  rpc_py_ops  rpc_py.ops.compress (allocates its score/index outputs and scoring workspace per call),
  rpc_py_v1_score (CUDA) the previous WMMA scoring kernels (version=1) + select + compact,
  reference   rpc_py.reference.compress_reference (float64 oracle),
  public      rpc_py.reference.public_algorithm_reference (the public code's style: input-dtype logits
              over all L tokens with K repeated G times, softmax, topk, gather + cat), in the input dtype.
Reports ms per layer (median of --repeats, runs interleaved), speedups, and the achieved bandwidth
of rpc_py against the minimum traffic (read the candidate keys once + read and write the kept K and V),
also as a fraction of the device's own copy rate measured first in the same run. The JSON is written
after every length, so a run stopped by a time limit keeps what it measured.

Cache length L = prompt + n*T + P + R with T = P // ratio; the n-th compression keeps (n+1)*T of the
N = L - prompt - R candidates.

    python benchmarks/bench_compress.py --device cpu
    python benchmarks/bench_compress.py --device cuda
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from rpc_py import _C, ops
from rpc_py._report import copy_bandwidth_gbps, cpu_name
from rpc_py.reference import compress_reference, public_algorithm_reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int)
    p.add_argument("--q-heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--lengths", type=int, nargs="+", help="cache lengths L before compression")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--window", type=int, default=32, help="R: selector queries and protected recent tokens")
    p.add_argument("--interval", type=int, default=4096, help="P: generated tokens between compressions")
    p.add_argument("--ratio", type=int, default=4, help="c: keep T = P // c tokens per interval")
    p.add_argument("--repeats", type=int)
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) float64 oracle")
    p.add_argument("--json", help="output path (default benchmarks/results/bench_compress_<device>.json)")
    p.add_argument("--copy-gbps", type=float, help="the device's copy rate in GB/s (default: measured first, or "
                                                     "RPC_PY_COPY_GBPS)")
    a = p.parse_args()
    cuda = a.device == "cuda"
    a.batch = a.batch or (32 if cuda else 4)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    # CPU default: N = 8192 candidates (n = 4 compressions done, P = 4096).
    a.lengths = a.lengths or ([4256, 7328, 11424] if cuda else [a.prompt + 8192 + a.window])
    a.repeats = a.repeats or (20 if cuda else 5)
    a.json = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"bench_compress_{a.device}.json")
    return a


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = cpu_name(fallback=platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def timer(device):
    """Returns run(fn, setup) -> milliseconds of fn() (setup() runs before, untimed)."""
    if device == "cuda":
        def run(fn, setup):
            setup()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
    else:
        def run(fn, setup):
            setup()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def bench_length(a, L, run):
    dev, dtype = a.device, DTYPES[a.dtype]
    B, Hq, Hkv, D, R = a.batch, a.q_heads, a.kv_heads, a.head_dim, a.window
    T = a.interval // a.ratio
    N = L - a.prompt - R
    n = max(0, (N - a.interval) // T)
    keep = min(N, (n + 1) * T)
    g = torch.Generator(device=dev).manual_seed(L)
    q = torch.randn(B, Hq, R, D, generator=g, device=dev).to(dtype)
    k0 = torch.randn(B, Hkv, L, D, generator=g, device=dev).to(dtype)
    v0 = torch.randn(B, Hkv, L, D, generator=g, device=dev).to(dtype)
    k, v = k0.clone(), v0.clone()

    def reset():
        k.copy_(k0)
        v.copy_(v0)

    def ours_ops():
        ops.compress(q, k, v, a.prompt, keep, R)

    # The production path: KVCache.compress with the cache's reused scratch (no allocation, no sync).
    stream = torch.cuda.current_stream().cuda_stream if dev == "cuda" else None
    kv = _C.KVCache(1, B, Hkv, D, a.dtype, capacity=L, fixed_capacity=True, window=R, q_heads=Hq)

    def kv_setup():
        kv.reset(stream=stream)
        kv.append(0, k0, v0, stream=stream)
        kv.record_query(0, q, stream=stream)

    rows_per_seq = 1  # aggregation "all", RPC's default
    def ours():
        kept = torch.empty(B, rows_per_seq, keep, dtype=torch.int64, device=dev)  # as RPCCache does
        kv.compress(0, a.prompt, keep, stream=stream, indices_out=kept)

    def ours_v1():  # the previous scoring kernels (WMMA, version=1); select and compaction are the current ones
        s = _C.score(q, k, a.prompt, L - R, stream=stream, version=1)
        idx = _C.select(s, keep, stream=stream)
        _C.compact(k, v, idx, a.prompt, L - R, stream=stream)

    def public():
        public_algorithm_reference(q, k0, v0, a.prompt, keep, R)

    def reference():
        compress_reference(q, k0, v0, a.prompt, keep, R)

    variants = {"rpc_py": (ours, kv_setup), "rpc_py_ops": (ours_ops, reset), "public": (public, lambda: None)}
    if dev == "cuda":
        variants["rpc_py_v1_score"] = (ours_v1, reset)
    if not a.no_reference:
        variants["reference"] = (reference, lambda: None)
    for fn, setup in variants.values():  # warm-up
        run(fn, setup)
    times = {name: [] for name in variants}
    for _ in range(a.repeats):  # interleaved so that machine noise hits every variant alike
        for name, (fn, setup) in variants.items():
            times[name].append(run(fn, setup))
    ms = {name: statistics.median(t) for name, t in times.items()}
    es = k0.element_size()
    min_bytes = B * Hkv * N * D * es + 2 * 2 * B * Hkv * keep * D * es
    row = {
        "L": L, "N": N, "keep": keep, "n": n,
        "ms": ms,
        "ms_min": {name: min(t) for name, t in times.items()},
        "speedup_vs_public": ms["public"] / ms["rpc_py"],
        "min_bytes": min_bytes,
        "rpc_py_GBps": min_bytes / (ms["rpc_py"] * 1e-3) / 1e9,
    }
    row["rpc_py_of_copy"] = row["rpc_py_GBps"] / a.copy_gbps
    if "reference" in ms:
        row["speedup_vs_reference"] = ms["reference"] / ms["rpc_py"]
    return row


def main():
    a = parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    run = timer(a.device)
    a.copy_gbps = a.copy_gbps or copy_bandwidth_gbps(a.device, nbytes=(1 << 30) if a.device == "cuda" else (1 << 26))
    rows = []
    result = {
        "benchmark": "bench_compress",
        "device": a.device,
        "machine": machine(a.device),
        "torch": torch.__version__,
        "config": {"batch": a.batch, "q_heads": a.q_heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                   "dtype": a.dtype, "prompt": a.prompt, "window": a.window, "interval": a.interval,
                   "ratio": a.ratio, "repeats": a.repeats},
        "copy_GBps": a.copy_gbps,
        "rows": rows,
    }
    if a.device == "cpu":
        result["cpu_isa"] = _C._cpu_isa()
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    for L in a.lengths:
        rows.append(bench_length(a, L, run))
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, a.json)
    print(f"machine: {result['machine']}" + (f", isa {result['cpu_isa']}" if "cpu_isa" in result else ""))
    print(f"B={a.batch} Hq={a.q_heads} Hkv={a.kv_heads} D={a.head_dim} {a.dtype} R={a.window} "
          f"P={a.interval} c={a.ratio}; ms per layer (median of {a.repeats}); JSON: {a.json}")
    head = f"{'L':>6} {'N':>6} {'keep':>6} {'rpc_py':>9} {'ops':>9} {'v1 score':>9} {'public':>9} {'ref f64':>9} " \
           f"{'x public':>9} {'x ref':>7} {'GB/s':>7} {'of copy':>7}"
    print(head)
    for r in rows:
        ref = r["ms"].get("reference")
        ref_ms = f"{ref:.2f}" if ref else "-"
        ref_x = f"{r['speedup_vs_reference']:.2f}" if ref else "-"
        v1 = r["ms"].get("rpc_py_v1_score")
        v1_ms = f"{v1:.3f}" if v1 else "-"
        print(f"{r['L']:>6} {r['N']:>6} {r['keep']:>6} {r['ms']['rpc_py']:>9.3f} {r['ms']['rpc_py_ops']:>9.3f} "
              f"{v1_ms:>9} {r['ms']['public']:>9.2f} {ref_ms:>9} {r['speedup_vs_public']:>9.2f} {ref_x:>7} "
              f"{r['rpc_py_GBps']:>7.2f} {r['rpc_py_of_copy']:>7.3f}")
    print(f"of copy = rpc_py's minimum traffic / time as a fraction of the copy rate ({a.copy_gbps:.1f} GB/s)")

if __name__ == "__main__":
    main()
