"""Which tokens a selection policy keeps on the loop-trace model, and where generation first departs
from the full KV cache.

``python benchmarks/kept_tokens.py --setting P=64,R=32,c=4 --problems 50`` generates every problem
twice, greedily: with the full cache and with the setting (any policy: ``...,policy=recent``). For
each it reports whether the answer is right, the first generated token where the two differ, and
whether the two constants' values (the digits written once in the trace's first line,
``k = 5 + 4 : k 9 ; m = k * 2 : m 8 ;``, which every later line reads) are still in each layer's
cache at the end (in every KV head's row). ``--show N`` prints, for the first N problems that diverge, the context at the
divergence and the generated tokens each layer attended over in that step.

The loop-trace task is described in ``rpc_py/tracemodel/task.py``; the model is the one shipped in
the package unless ``--model DIR``. One sequence at a time (no padding), float32, CPU or CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import rpc_py
from rpc_py import RPCCache
from rpc_py.accuracy import parse_setting
from rpc_py.tracemodel import EVAL_SPEC, heldout_problems, load, trace_length
from rpc_py.tracemodel.task import extract_answer


def constant_value_offsets(spec) -> list[int]:
    """Offsets (in generated tokens) of the constants' value digits: each constant's line is
    ``k = a op b : k V ;`` (9 tokens), V at offset 7."""
    return [9 * j + 7 for j in range(spec.constants)]


def run(model, tok, problem: dict, rpc, max_new: int):
    """Greedy generation through an RPCCache that keeps every compression's slot layout."""
    enc = tok([problem["problem"]], return_tensors="pt").to(model.device)
    cache = RPCCache(model, rpc, keep_layouts=True)
    with torch.no_grad(), rpc_py.compress(model, rpc):
        out = model.generate(**enc, past_key_values=cache, max_new_tokens=max_new, do_sample=False)
    return enc.input_ids.shape[1], out[0].tolist(), cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="P=64,R=32,c=4", help="an RPCConfig as in rpc_py.accuracy (policy=... too)")
    p.add_argument("--problems", type=int, default=50)
    p.add_argument("--show", type=int, default=2)
    p.add_argument("--model", default=None, help="a loop-trace checkpoint folder (default: the shipped one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the per-problem records")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load(path=args.model)
    rpc = parse_setting(args.setting).rpc
    if rpc is None:
        raise SystemExit("--setting: give a compressed setting (full KV is the comparison)")
    spec = EVAL_SPEC
    max_new = trace_length(spec, spec.iterations[1]) + 8
    offsets = constant_value_offsets(spec)
    layers = model.config.num_hidden_layers
    records, shown = [], 0
    for problem in heldout_problems(args.problems, spec=spec):
        lp, full, _ = run(model, tok, problem, None, max_new)
        _, comp, cache = run(model, tok, problem, rpc, max_new)
        kept_consts = []
        for layer in range(layers):
            rows = [set(r) for r in cache.logical_positions(layer)[0].tolist()]  # one per KV head
            kept_consts.append(all(lp + o in row for o in offsets for row in rows))
        diverge = next((i for i in range(lp, min(len(full), len(comp))) if full[i] != comp[i]), None)
        rec = {"seed": problem["seed"], "answer": problem["answer"],
               "full_correct": extract_answer(tok.decode(full[lp:], skip_special_tokens=True)) == problem["answer"],
               "correct": extract_answer(tok.decode(comp[lp:], skip_special_tokens=True)) == problem["answer"],
               "first_divergence": None if diverge is None else diverge - lp,
               "constants_kept_per_layer": kept_consts}
        records.append(rec)
        if diverge is not None and shown < args.show:
            shown += 1
            words = tok.convert_ids_to_tokens(full)
            print(f"\nseed {problem['seed']}: first divergence at generated token {diverge - lp}")
            print(f"  full KV: ... {' '.join(words[max(lp, diverge - 24):diverge])} [{words[diverge]}]"
                  f"   compressed wrote [{tok.convert_ids_to_tokens([comp[diverge]])[0]}]")
            for layer in range(layers):
                # the slots the step that wrote token `diverge` attended over (it read token diverge - 1)
                held = cache.logical_positions(layer, seen=diverge)[0, 0].tolist()  # KV head 0
                pos = [q for q in held if q >= lp]
                text = " ".join(words[q] + (" |" if b - q > 1 else "") for q, b in zip(pos, pos[1:] + [10**9]))
                print(f"  layer {layer} attended over (| = evicted tokens between): {text}")
    n = len(records)
    print(f"\n{args.setting} ({rpc.policy_name}), {n} held-out problems:")
    print(f"  accuracy: full KV {sum(r['full_correct'] for r in records) / n:.1%}, "
          f"compressed {sum(r['correct'] for r in records) / n:.1%}")
    div = [r["first_divergence"] for r in records if r["first_divergence"] is not None]
    first = rpc.interval + rpc.window
    print(f"  generations that differ from full KV: {len(div)}/{n}; first compression after {first} tokens; "
          f"median first divergence {sorted(div)[len(div) // 2] if div else '-'}")
    for layer in range(layers):
        kept = sum(r["constants_kept_per_layer"][layer] for r in records)
        print(f"  layer {layer}: both constants' values still cached at the end in {kept}/{n}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setting": args.setting, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
