"""Decode attention (q_len = 1): rpc_py._C.decode_attention vs torch SDPA on the same live KV.

One question: how fast is one layer's decode attention over a fixed-capacity cache whose live length
is read on the device, compared with SDPA over exactly the live slice (enable_gqa, no mask, the
fastest backend torch picks)? Prints a table (time per call, achieved K+V read bandwidth) and writes
JSON. CUDA by default (R1-Distill-Qwen-7B shape: 28 query heads, 4 KV heads, head_dim 128, bf16);
``--device cpu`` runs small CPU sizes.

    python benchmarks/bench_decode_attention.py [--device cuda|cpu] [--batch 1 32] [--lengths 4096 16384 65536]
"""

import argparse
import json
import time

import torch

from rpc_py import _C


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
    a = ap.parse_args()
    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    batches = a.batch or ([1, 32] if dev == "cuda" else [1, 4])
    lengths = a.lengths or ([4096, 16384, 32768, 65536] if dev == "cuda" else [1024, 4096])
    iters = a.iters if dev == "cuda" else 5
    rows = []
    print(f"{'batch':>5} {'length':>7} {'rpc_ms':>9} {'sdpa_ms':>9} {'rpc_GB/s':>9} {'sdpa_GB/s':>9} {'max_err':>9}")
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
            lengths_t = torch.tensor([L, L], device=dev)
            splits, n = _C.decode_workspace_size(B, Hq, Hkv, D, cap)
            ws = torch.empty(max(n, 1), device=dev)
            stream = torch.cuda.current_stream().cuda_stream if dev == "cuda" else None
            ks, vs = k[:, :, :L], v[:, :, :L]

            def ours():
                _C.decode_attention(q, k, v, out, lengths_t, workspace=ws, splits=splits, stream=stream)

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)

            t_ours, t_sdpa = timeit(ours, dev, iters), timeit(sdpa, dev, iters)
            err = (out.float() - sdpa().float()).abs().max().item()
            nbytes = 2 * B * Hkv * L * D * k.element_size()
            row = dict(batch=B, length=L, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=str(dtype), splits=splits,
                       rpc_s=t_ours, sdpa_s=t_sdpa, rpc_GBps=nbytes / t_ours / 1e9, sdpa_GBps=nbytes / t_sdpa / 1e9,
                       max_abs_err=err, device=dev)
            rows.append(row)
            print(f"{B:>5} {L:>7} {1e3 * t_ours:>9.3f} {1e3 * t_sdpa:>9.3f} {row['rpc_GBps']:>9.1f} "
                  f"{row['sdpa_GBps']:>9.1f} {err:>9.2e}")
            del k, v
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
