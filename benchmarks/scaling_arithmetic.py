"""The memory and decode-bound arithmetic of docs/scaling.md, from the model shapes and RPC's schedule.

Nothing here is measured: it multiplies shapes and integrates a roofline over the generation. For each
model (R1-7B: 28 layers, 4 KV heads, head_dim 128; QwQ-32B: 64 layers, 8 KV heads, head_dim 128; bf16)
and full KV vs RPC (P=4096, R=32, c=4, ``RPCConfig.length_schedule``), at prompt 128 and 32K output:

* KV per sequence at the peak and averaged over the trace;
* batch 32 in lockstep (the paper's setting): weights + peak KV per GPU for tensor-parallel sizes 1/2/4,
  and a decode bound summing, step by step, max(bytes / bandwidth, flops / peak flops) with every
  step reading the weights (sharded) and every sequence's KV once;
* continuous batching: sequences in flight (held by the tensor-parallel group, each GPU a shard of
  each) when every GPU's KV budget (a fraction of its memory minus its weight shard) holds sequences
  of the *mean* length, and the bound at that batch, per GPU;
* the bytes of one compression (keys scored, K/V moved) and of the tensor-parallel score all-reduce.

Defaults are the H200 figures in the project's notes (139 GiB, 4.27 TB/s measured copy, 790 TFLOP/s
measured bf16 matmul, 90% usable). Prints tables and writes JSON (default
benchmarks/results/scaling_arithmetic.json).

    python benchmarks/scaling_arithmetic.py
"""

import argparse
import json
import os

from rpc_py import RPCConfig

MODELS = {
    # name: (layers, KV heads, query heads, head_dim, parameters)
    "R1-7B": (28, 4, 28, 128, 7.62e9),
    "QwQ-32B": (64, 8, 40, 128, 32.76e9),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=32768)
    p.add_argument("--interval", type=int, default=4096)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="lockstep batch")
    p.add_argument("--gpu-gib", type=float, default=139.0)
    p.add_argument("--usable", type=float, default=0.90, help="fraction of GPU memory for weights + KV")
    p.add_argument("--bandwidth", type=float, default=4.27e12, help="bytes/s")
    p.add_argument("--flops", type=float, default=790e12, help="bf16 FLOP/s")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "scaling_arithmetic.json"))
    return p.parse_args()


def step_time(a, weights, params, lengths_sum, batch, tp, shape):
    """Roofline time of one decode step (seconds): bytes over bandwidth or flops over peak."""
    layers, kvh, hq, d, _ = shape
    kv_token = 2 * layers * kvh * d * 2
    byte_time = (weights + lengths_sum * kv_token) / tp / a.bandwidth
    flop_time = (batch * 2 * params + 4 * lengths_sum * hq * d * layers) / tp / a.flops
    return max(byte_time, flop_time), flop_time > byte_time


def main():
    a = parse_args()
    rpc = RPCConfig(interval=a.interval, window=a.window, ratio=a.ratio)
    schedules = {
        "full": [a.prompt + t for t in range(1, a.output + 1)],
        "rpc": rpc.length_schedule(a.prompt, a.output),
    }
    usable = a.usable * a.gpu_gib * 2**30
    out = dict(settings=vars(a) | {"rpc": repr(rpc)}, models={})
    for name, shape in MODELS.items():
        layers, kvh, hq, d, params = shape
        kv_token = 2 * layers * kvh * d * 2
        weights = 2 * params
        m = out["models"][name] = dict(kv_bytes_per_token=kv_token, weight_bytes=weights,
                                       ring_bytes_per_sequence=a.window * hq * d * 2 * layers, configs={})
        print(f"\n{name}: KV {kv_token / 1024:.0f} KiB/token, weights {weights / 1e9:.1f} GB, "
              f"query ring {m['ring_bytes_per_sequence'] / 2**20:.2f} MiB/sequence")
        print(f"{'config':>6} {'peak len':>9} {'mean len':>9} {'peak GB/seq':>12} {'mean GB/seq':>12}  "
              f"{'TP':>3} {'lockstep GB/GPU':>16} {'fits':>5} {'lockstep tok/s':>15} {'in flight':>14} "
              f"{'continuous tok/s/GPU':>21}")  # in flight: sequences the tensor-parallel group holds
        for label, lengths in schedules.items():
            peak, mean = max(lengths), sum(lengths) / len(lengths)
            c = m["configs"][label] = dict(peak_length=peak, mean_length=mean, peak_bytes=peak * kv_token,
                                           mean_bytes=mean * kv_token, tp={})
            for tp in a.tp:
                per_gpu = (weights + a.batch * peak * kv_token) / tp
                total = sum(step_time(a, weights, params, a.batch * n, a.batch, tp, shape)[0] for n in lengths)
                budget = usable - weights / tp
                in_flight = max(int(budget // (mean * kv_token / tp)), 0)
                st, compute_bound = step_time(a, weights, params, in_flight * mean, in_flight, tp, shape)
                c["tp"][tp] = dict(lockstep_bytes_per_gpu=per_gpu, lockstep_fits=per_gpu <= usable,
                                   lockstep_tokens_per_s=a.batch * a.output / total,
                                   continuous_sequences=in_flight,  # each GPU of the group holds a shard of each
                                   continuous_tokens_per_s=in_flight / st if in_flight else 0.0,
                                   continuous_compute_bound=compute_bound)
                t = c["tp"][tp]
                print(f"{label:>6} {peak:>9} {mean:>9.0f} {peak * kv_token / 1e9:>12.3f} {mean * kv_token / 1e9:>12.3f}  "
                      f"{tp:>3} {per_gpu / 1e9:>16.1f} {'yes' if t['lockstep_fits'] else 'no':>5} "
                      f"{t['lockstep_tokens_per_s']:>15.0f} {in_flight:>14} "
                      f"{t['continuous_tokens_per_s'] / tp:>21.0f}")
        n = rpc.compressions_after(a.output)
        candidates = (n - 1) * rpc.kept_per_interval + rpc.interval
        keep = rpc.kept_after(n)
        key_bytes = candidates * kvh * d * 2 * layers
        moved = 2 * (keep + rpc.window) * kvh * d * 2 * layers
        scored = sum(((k - 1) * rpc.kept_per_interval + rpc.interval) * kvh * d * 2 * layers for k in range(1, n + 1))
        moved_all = sum(2 * (rpc.kept_after(k) + rpc.window) * kvh * d * 2 * layers for k in range(1, n + 1))
        decode_kv = sum(schedules["rpc"]) * kv_token
        m["last_compression"] = dict(index=n, candidates=candidates, keep=keep, key_bytes=key_bytes,
                                     moved_bytes_at_most=moved,
                                     tp_all_reduce_bytes_per_layer=a.batch * candidates * 4)
        m["compression_share_of_decode_kv_bytes"] = (scored + moved_all) / decode_kv
        print(f"last compression (#{n}): {candidates} candidates, keep {keep}: keys read {key_bytes / 1e6:.0f} MB, "
              f"K/V moved <= {moved / 1e6:.0f} MB per sequence; TP all-reduce {a.batch * candidates * 4 / 1e6:.2f} MB "
              f"per layer at batch {a.batch}; all compressions = {100 * m['compression_share_of_decode_kv_bytes']:.3f}% "
              "of the KV bytes decoding reads")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"\nwrote {a.json} (arithmetic, not measurements)")


if __name__ == "__main__":
    main()
