"""Decode attention (q_len = 1): rpc_py._C.decode_attention (v2 tensor-core kernel and the v1 kernel)
vs torch SDPA on the same live KV.

One question: how fast is one layer's decode attention over a fixed-capacity cache whose live length
is read on the device, compared with SDPA over exactly the live slice (enable_gqa, no mask, the
fastest backend torch picks)? On CUDA each variant is timed as a CUDA graph of --iters calls (the way
the static decode loop runs; --no-graph times an eager loop). Prints a table (time per call, achieved
K+V read bandwidth = K+V bytes of the live length / time, also as a fraction of the device's copy rate
measured in the same run) and writes JSON after every size. CUDA by default (R1-Distill-Qwen-7B shape: 28 query heads, 4 KV heads, head_dim 128, bf16);
``--device cpu`` runs small CPU sizes.

    python benchmarks/bench_decode_attention.py [--device cuda|cpu] [--batch 1 32] [--lengths 4096 16384 65536]
"""

import argparse
import json
import os
import time

import torch

from rpc_py import _C
from rpc_py._report import copy_bandwidth_gbps


def timeit(fn, device, iters):
    for _ in range(3):
        fn()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def timeit_graph(fn, iters):
    """Seconds per call of fn() recorded `iters` times in one CUDA graph and replayed (no launch
    overhead: how the static decode loop runs it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--q-heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default="bench_decode_attention.json")
    ap.add_argument("--no-graph", action="store_true", help="time an eager loop instead of a captured graph")
    ap.add_argument("--copy-gbps", type=float, help="the device's copy rate in GB/s (default: measured first, or "
                                                      "RPC_PY_COPY_GBPS)")
    a = ap.parse_args()
    dev = a.device
    copy_gbps = a.copy_gbps or copy_bandwidth_gbps(dev, nbytes=(1 << 30) if dev == "cuda" else (1 << 26))
    print(f"device copy rate: {copy_gbps:.1f} GB/s (read + write)")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    batches = a.batch or ([1, 32] if dev == "cuda" else [1, 4])
    lengths = a.lengths or ([4096, 16384, 32768, 65536] if dev == "cuda" else [1024, 4096])
    iters = a.iters if dev == "cuda" else 5
    rows = []
    graph = dev == "cuda" and not a.no_graph
    print(f"timing: {'CUDA graph of ' + str(iters) + ' calls' if graph else 'eager loop'}; GB/s = K+V bytes of the "
          f"live length / time")
    print(f"{'batch':>5} {'length':>7} {'v2_ms':>8} {'v1_ms':>8} {'sdpa_ms':>8} {'v2_GB/s':>8} {'v1_GB/s':>8} "
          f"{'sdpa_GB/s':>9} {'v2/sdpa':>7} {'max_err':>9}")
    for B in batches:
        for L in lengths:
            cap = L + 64  # fixed capacity a little above the live length, as in the static decode loop
            Hq, Hkv, D = a.q_heads, a.kv_heads, a.head_dim
            try:
                k = torch.randn(B, Hkv, cap, D, device=dev, dtype=dtype)
                v = torch.randn(B, Hkv, cap, D, device=dev, dtype=dtype)
            except torch.OutOfMemoryError:
                print(f"{B:>5} {L:>7}  (out of memory)")
                continue
            q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
            out = torch.empty(B, Hq, 1, D, device=dev, dtype=dtype)
            out1 = torch.empty_like(out)
            lengths_t = torch.tensor([L, L], device=dev)
            splits, n = _C.decode_workspace_size(B, Hq, Hkv, D, cap)
            ws = torch.empty(max(n, 1), device=dev)
            ks, vs = k[:, :, :L], v[:, :, :L]
            sdpa_out = torch.empty_like(out)

            def ours(version, o):
                stream = torch.cuda.current_stream().cuda_stream if dev == "cuda" else None
                _C.decode_attention(q, k, v, o, lengths_t, workspace=ws, splits=splits, stream=stream,
                                    version=version)

            def sdpa():
                sdpa_out.copy_(torch.nn.functional.scaled_dot_product_attention(q, ks, vs, enable_gqa=True))

            def t(fn):
                return timeit_graph(fn, iters) if graph else timeit(fn, dev, iters)

            v2_ok = dev == "cuda" and dtype != torch.float32
            t_v2 = t(lambda: ours(2, out)) if v2_ok else None
            t_v1 = t(lambda: ours(1 if dev == "cuda" else 0, out1))
            t_sdpa = t(sdpa)
            ref = sdpa_out.float()
            err = (out.float() - ref).abs().max().item() if v2_ok else (out1.float() - ref).abs().max().item()
            nbytes = 2 * B * Hkv * L * D * k.element_size()
            gbps = lambda x: nbytes / x / 1e9 if x else None  # noqa: E731
            row = dict(batch=B, length=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=str(dtype), splits=splits,
                       graph=graph, v2_s=t_v2, v1_s=t_v1, sdpa_s=t_sdpa, v2_GBps=gbps(t_v2), v1_GBps=gbps(t_v1),
                       sdpa_GBps=gbps(t_sdpa), kv_bytes=nbytes, max_abs_err=err, device=dev,
                       machine=torch.cuda.get_device_name() if dev == "cuda" else "cpu", copy_GBps=copy_gbps,
                       v2_of_copy=gbps(t_v2) / copy_gbps if t_v2 else None, v1_of_copy=gbps(t_v1) / copy_gbps,
                       sdpa_of_copy=gbps(t_sdpa) / copy_gbps)
            rows.append(row)
            tmp = a.json + ".tmp"
            with open(tmp, "w") as fh:  # after every size: a run stopped by a time limit keeps what it measured
                json.dump(rows, fh, indent=1)
            os.replace(tmp, a.json)
            f = lambda x, w, p: f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"  # noqa: E731
            print(f"{B:>5} {L:>7} {f(t_v2 and 1e3 * t_v2, 8, 3)} {f(1e3 * t_v1, 8, 3)} {1e3 * t_sdpa:>8.3f} "
                  f"{f(row['v2_GBps'], 8, 1)} {row['v1_GBps']:>8.1f} {row['sdpa_GBps']:>9.1f} "
                  f"{f(t_v2 and t_sdpa / t_v2, 7, 2)} {err:>9.2e}")
            k = v = ks = vs = None  # free before the next size is allocated
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"fraction of the copy rate ({copy_gbps:.0f} GB/s): " + ", ".join(
        f"B={r['batch']} L={r['length']}: v2 {r['v2_of_copy'] or 0:.2f} v1 {r['v1_of_copy']:.2f} "
        f"sdpa {r['sdpa_of_copy']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
