"""What makes a selection rule work: a factorial over the design space, and the mechanism behind it.

On loop-trace models (``rpc_py.tracemodel``; the shipped one and any trained with
``python -m rpc_py.tracemodel.train``) and fresh held-out problems, every cell of

    softmax normalization (candidates | causal) x aggregation (all | group) x pooling kernel (5 | 7)

runs as ``rpc_py.policies.Attention`` at the same schedule (so at exactly the same memory) at two memory
levels (``--ratios``), next to H2O (the rule outside the space that wins at c=2 on the shipped model),
one point of the query-weighting knob (recency, half-life 8) and the other rules of the ablations
(R-KV, TOVA, recent, random): on each model given, the headline comparisons and the factorial. The
paper's RPC is the cell (candidates, all, 7) and SnapKV at decode the cell (causal, group, 5).

Statistics: every cell is compared with RPC on the same problems (paired: exact two-sided McNemar
on the discordant pairs); the p-values of every comparison in the run (all cells, both memory levels,
every model) are adjusted together by Holm's step-down method, and only adjusted values are called
significant. Accuracy intervals are 95% Wilson. With several models, ``agreement`` lists each cell's
verdict against RPC on every model (above, below, no significant difference) and whether they agree.

The mechanism (``--mechanism``): during RPC's own run, at every compression, the causal attention mass
each window query puts on the candidates, per layer and KV head (a query whose mass on the candidates is
near 0 still hands them a full unit of weight when the softmax is normalized over the candidates only).

Memory: the schedule fixes the KV length, the same for every cell. The state a policy holds beyond K/V
is reported beside it (``state_bytes``): the selector-query ring (Hq x R x D per layer) for every
attention-based cell, the accumulator (Hkv x L float32 per layer) for H2O.

    python benchmarks/design_space.py --out benchmarks/results/design_space.json              # full
    python benchmarks/design_space.py --quick                                                  # seconds
    python benchmarks/design_space.py --models shipped benchmarks/trace_models/seed1 ...       # several models
    python benchmarks/design_space.py --merge a.json b.json --out all.json   # runs made in parallel, one model each
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from rpc_py import RPCConfig  # noqa: E402
from rpc_py._report import cpu_name  # noqa: E402
from rpc_py.accuracy import Setting, evaluate, holm, mcnemar_exact, wilson_interval  # noqa: E402
from rpc_py.policies import H2O, RKV, TOVA, Attention, Random, Recent  # noqa: E402
from rpc_py.tracemodel import EVAL_SPEC, TaskSpec, heldout_problems, trace_length  # noqa: E402

# Fresh problems: the shipped ablations use HELD_OUT_START .. +200, training seeds lie below
# HELD_OUT_START and training monitors from 2e9; this range is used by nothing else.
FIRST_SEED = 1_000_100_000
NORMS, AGGREGATIONS, KERNELS = ("candidates", "causal"), ("all", "group"), (5, 7)


#: the named rules of the ablations outside the factorial (SnapKV is its cell causal/group/k5, H2O is always run)
BASELINES = ("rkv", "tova", "recent", "random")
#: the comparisons of the ablations, on every model (``--cells headline``)
HEADLINE = ("rpc", "causal/group/k5", "h2o") + BASELINES


def cell_name(norm: str, aggregation: str, kernel: int) -> str:
    """A factorial cell's name; RPC's own cell is "rpc"."""
    return "rpc" if (norm, aggregation, kernel) == ("candidates", "all", 7) else f"{norm}/{aggregation}/k{kernel}"


def cells(baselines: bool = True) -> dict:
    """name -> policy object, RPC first (the baseline of every comparison); with ``baselines`` also
    R-KV, TOVA, recent and random, so that each model gets the headline comparisons of the ablations."""
    out = {"rpc": Attention()}
    for norm, agg, k in itertools.product(NORMS, AGGREGATIONS, KERNELS):
        if cell_name(norm, agg, k) != "rpc":
            out[cell_name(norm, agg, k)] = Attention(norm=norm, aggregation=agg, kernel_size=k)
    out["causal/group/k5/recency"] = Attention(norm="causal", aggregation="group", kernel_size=5, weighting="recency",
                                               half_life=8.0)
    out["h2o"] = H2O()
    if baselines:
        out.update(rkv=RKV(), tova=TOVA(), recent=Recent(), random=Random())
    return out


class MassProbe(Attention):
    """RPC's own scores (``Attention()`` is RPC's point), plus a record of each window query's causal
    attention mass on the candidates, per KV head (one-hot query weights through the shared scorer)."""

    records: list = []  # class-level: policy objects are frozen dataclasses

    def scores(self, ctx):
        queries, positions = ctx.window_queries()
        R = queries.shape[2]
        masses = []
        for r in range(R):
            w = torch.zeros(R, dtype=torch.float32, device=queries.device)
            w[r] = 1.0
            probs = ctx.attention(queries, positions, norm="causal", aggregation="group", pooling="avg", kernel_size=1,
                                  query_weights=w)  # [B, Hkv, N]: mean over the KV head's query heads
            masses.append(probs.sum(-1).float().cpu())
        MassProbe.records.append({"layer": ctx.layer, "compression": ctx.compression,
                                  "mass": torch.stack(masses, -1).tolist()})  # [B, Hkv, R]
        return super().scores(ctx)


def state_bytes(model, rpc: RPCConfig, policy, peak_length: int) -> dict:
    c = model.config
    layers, hq = c.num_hidden_layers, c.num_attention_heads
    hkv = getattr(c, "num_key_value_heads", hq)
    d = getattr(c, "head_dim", None) or c.hidden_size // hq
    kv = 2 * layers * hkv * d * 4 * peak_length
    ring = layers * hq * rpc.window * d * 4 if policy.uses_queries else 0
    acc = layers * hkv * peak_length * 4 if policy.uses_accumulators else 0
    return {"kv_bytes": kv, "ring_bytes": ring, "accumulator_bytes": acc, "total_bytes": kv + ring + acc,
            "total_over_kv": (kv + ring + acc) / kv}


def run_model(label, path, args, problems, max_new):
    from rpc_py.tracemodel import load

    model, tok = load(path=None if path == "shipped" else path)
    out = {"path": path, "config": {k: getattr(model.config, k) for k in ("num_hidden_layers", "num_attention_heads",
                                                                             "num_key_value_heads", "hidden_size")},
           "levels": {}}
    full = evaluate(model, tok, problems, [Setting("full", None)], batch_size=args.batch_size, max_new_tokens=max_new,
                    progress=False)
    out["full"] = {"pass@1": full["summary"][0]["pass@1"], "correct": [r["correct"] for r in full["records"]]}
    print(f"[{label}] full KV pass@1 {out['full']['pass@1']:.3f}", flush=True)
    todo = cells(args.baselines)
    if args.cells:
        todo = {n: todo[n] for n in args.cells}
    for ratio in args.ratios:
        level = {}
        for name, policy in todo.items():
            rpc = RPCConfig(interval=args.interval, window=args.window, ratio=ratio, policy=policy)
            t0 = time.perf_counter()
            res = evaluate(model, tok, problems, [Setting(name, rpc)], batch_size=args.batch_size,
                           max_new_tokens=max_new, progress=False)
            s = res["summary"][0]
            correct = [bool(r["correct"]) for r in res["records"]]
            k = sum(correct)
            peak = max(rpc.peak_length(len(tok(p["problem"])["input_ids"]), max_new) for p in problems[:1])
            level[name] = {"correct": correct, "k": k, "n": len(correct), "pass@1": k / len(correct),
                           "ci95": wilson_interval(k, len(correct)),
                           "mean_peak_kv_fraction": s["mean_peak_kv_fraction"],
                           "state": state_bytes(model, rpc, policy, peak),
                           "seconds": time.perf_counter() - t0}
            print(f"[{label}] c={ratio} {name:<26} {k:4d}/{len(correct)}  KV {s['mean_peak_kv_fraction']:.3f}  "
                  f"({level[name]['seconds']:.0f} s)", flush=True)
        out["levels"][str(ratio)] = level
    if args.mechanism:
        MassProbe.records = []
        rpc = RPCConfig(interval=args.interval, window=args.window, ratio=args.ratios[0], policy=MassProbe())
        evaluate(model, tok, problems[: args.mechanism], [Setting("probe", rpc)], batch_size=args.batch_size,
                 max_new_tokens=max_new, progress=False)
        out["mechanism"] = summarize_mass(MassProbe.records, model.config.num_hidden_layers)
        print(f"[{label}] mechanism: {out['mechanism']['share_below_0.1']:.3f} of window queries put < 0.1 of their "
              f"attention on the candidates", flush=True)
    return out


def summarize_mass(records, layers: int) -> dict:
    import numpy as np

    per_layer = {l: [] for l in range(layers)}
    for rec in records:
        per_layer[rec["layer"]].extend(np.asarray(rec["mass"]).reshape(-1).tolist())
    every = np.asarray([m for v in per_layer.values() for m in v])
    hist, edges = np.histogram(every, bins=20, range=(0.0, 1.0))
    by_head = {}
    for rec in records:
        arr = np.asarray(rec["mass"])  # [B, Hkv, R]
        for h in range(arr.shape[1]):
            by_head.setdefault(f"{rec['layer']}/{h}", []).extend(arr[:, h].reshape(-1).tolist())
    return {"queries": int(every.size), "share_below_0.05": float((every < 0.05).mean()),
            "share_below_0.1": float((every < 0.1).mean()), "median": float(np.median(every)),
            "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
            "per_layer": {str(l): {"share_below_0.1": float((np.asarray(v) < 0.1).mean()) if v else None,
                                   "median": float(np.median(v)) if v else None} for l, v in per_layer.items()},
            "per_layer_head_share_below_0.1": {k: float((np.asarray(v) < 0.1).mean()) for k, v in by_head.items()}}


def compare(result) -> list[dict]:
    """Every cell vs RPC, paired, across every model and level; Holm-adjusted together."""
    rows = []
    for label, m in result["models"].items():
        for ratio, level in m["levels"].items():
            if "rpc" not in level:  # a run of other cells only (--cells), to be merged with RPC's
                continue
            base = level["rpc"]["correct"]
            for name, cell in level.items():
                if name == "rpc":
                    continue
                b = sum(1 for x, y in zip(cell["correct"], base) if x and not y)
                c = sum(1 for x, y in zip(cell["correct"], base) if y and not x)
                rows.append({"model": label, "ratio": int(ratio), "cell": name, "cell_k": cell["k"], "rpc_k": level["rpc"]["k"],
                             "n": cell["n"], "cell_only": b, "rpc_only": c, "p": mcnemar_exact(b, c)})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
        row["significant_holm_0.05"] = adj < 0.05
    return rows


def agreement(result) -> list[dict]:
    """For each (memory level, cell): the verdict on every model (``+`` above RPC, ``-`` below, ``=`` no
    Holm-significant difference) and whether the models agree."""
    verdicts = {}
    for r in result["comparisons"]:
        v = "=" if not r["significant_holm_0.05"] else ("+" if r["cell_k"] > r["rpc_k"] else "-")
        verdicts.setdefault((r["ratio"], r["cell"]), {})[r["model"]] = {"verdict": v, "cell_k": r["cell_k"],
                                                                        "rpc_k": r["rpc_k"], "n": r["n"],
                                                                        "p_holm": r["p_holm"]}
    rows = []
    for (ratio, cell), per_model in verdicts.items():
        signs = {v["verdict"] for v in per_model.values()}
        rows.append({"ratio": ratio, "cell": cell, "models": per_model,
                     "agree": "all " + signs.pop() if len(signs) == 1 else "differ"})
    return rows


def merge(paths: list[str]) -> dict:
    """One result from several runs of this script (models or cells run in parallel, or cells added
    later with ``--cells``): the settings must match; a model in several runs has its cells combined
    (each cell from one run only, the full-KV answers identical); comparisons and agreement are
    recomputed over everything together."""
    runs = [json.load(open(p)) for p in paths]
    for r in runs:  # runs from before --iterations used the shipped family
        r["settings"].setdefault("iterations", list(EVAL_SPEC.iterations))
    result = dict(runs[0], models={}, command=" ; ".join(r["command"] for r in runs),
                  machines=[m for r in runs for m in r.get("machines", [r["machine"]])])  # a merged input keeps its list
    for path, r in zip(paths, runs):
        if r["settings"] != runs[0]["settings"]:
            raise ValueError(f"{path}: settings {r['settings']} differ from {paths[0]}'s {runs[0]['settings']}")
        for label, m in r["models"].items():
            have = result["models"].get(label)
            if have is None:
                result["models"][label] = json.loads(json.dumps(m))
                continue
            if have["full"]["correct"] != m["full"]["correct"]:
                raise ValueError(f"{path}: model {label!r} gives other full-KV answers than in an earlier run")
            for ratio, level in m["levels"].items():
                into = have["levels"].setdefault(ratio, {})
                for name, cell in level.items():
                    if name in into:
                        raise ValueError(f"{path}: model {label!r} c={ratio} cell {name!r} is in more than one run")
                    into[name] = cell
            if "mechanism" in m:
                have.setdefault("mechanism", m["mechanism"])
    result["comparisons"] = compare(result)
    result["agreement"] = agreement(result)
    return result


def print_tables(result):
    factorial = [cell_name(*c) for c in itertools.product(NORMS, AGGREGATIONS, KERNELS)]
    for label, m in result["models"].items():
        print(f"\n{label}: full KV {m['full']['pass@1']:.3f}")
        for ratio, level in m["levels"].items():
            if not all(name in level for name in factorial):
                continue  # the factorial was not run on this model (--cells)
            print(f"  c={ratio}    k=5 all   k=5 group   k=7 all   k=7 group")
            for norm in NORMS:
                vals = []
                for k in KERNELS:
                    for agg in AGGREGATIONS:
                        vals.append(f"{level[cell_name(norm, agg, k)]['pass@1']:9.3f}")
                print(f"  {norm:<10}" + " ".join(vals))
    labels = list(result["models"])
    print("\nheadline, correct of n (95% Wilson), per model:")
    for ratio in next(iter(result["models"].values()))["levels"]:
        print(f"  c={ratio:<3}" + "".join(f"{lb:>22}" for lb in labels))
        for name in HEADLINE:
            cellv = [result["models"][lb]["levels"][ratio].get(name) for lb in labels]
            print(f"  {name:<16}" + "".join(
                f"{c['k']:>6} ({c['ci95'][0]:.2f}-{c['ci95'][1]:.2f})    " if c else f"{'-':>22}" for c in cellv))
    print("\nverdict vs RPC per model (+ above, - below, = no Holm-significant difference):")
    for a in result.get("agreement", []):
        print(f"  c={a['ratio']:<2} {a['cell']:<26} " + " ".join(a["models"][lb]["verdict"] if lb in a["models"] else "?"
                                                              for lb in labels) + f"   {a['agree']}")
    print("\npaired vs RPC (exact McNemar, Holm over all rows):")
    for r in result["comparisons"]:
        flag = "*" if r["significant_holm_0.05"] else " "
        print(f"  {flag} {r['model']:<10} c={r['ratio']:<2} {r['cell']:<26} {r['cell_k']:4d} vs {r['rpc_k']:4d}  "
              f"(+{r['cell_only']}/-{r['rpc_only']})  p={r['p']:.2g}  p_holm={r['p_holm']:.2g}")


def markdown(result) -> str:
    """The headline table (correct of n, 95% Wilson, per model and level) and the verdict table, as
    docs/ablations.md shows them: written from the results, never by hand."""
    labels, out = list(result["models"]), []
    levels = sorted({lv for m in result["models"].values() for lv in m["levels"]}, key=int)
    out.append("| rule | " + " | ".join(f"{lb}, c={lv}" for lv in levels for lb in labels) + " |")
    out.append("|---" * (1 + len(levels) * len(labels)) + "|")
    out.append("| full KV | " + " | ".join(f"{result['models'][lb]['full']['pass@1']:.1%}" for lv in levels for lb in labels) + " |")
    for name in HEADLINE:
        vals = []
        for lv in levels:
            for lb in labels:
                c = result["models"][lb]["levels"].get(lv, {}).get(name)
                vals.append(f"{c['k']} ({c['ci95'][0]:.0%}-{c['ci95'][1]:.0%})" if c else "-")
        label = "snapkv's cell (causal/group/k5)" if name == "causal/group/k5" else name
        out.append(f"| {label} | " + " | ".join(vals) + " |")
    out.append("")
    out.append("| c | rule vs RPC | " + " | ".join(labels) + " | verdict |")
    out.append("|---" * (3 + len(labels)) + "|")
    for a in result.get("agreement", []):
        cellv = []
        for lb in labels:
            v = a["models"].get(lb)
            cellv.append(f"{v['verdict']} {v['cell_k']} vs {v['rpc_k']} (p_holm {v['p_holm']:.2g})" if v else "-")
        out.append(f"| {a['ratio']} | {a['cell']} | " + " | ".join(cellv) + f" | {a['agree']} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["shipped"], help="'shipped' or trained model folders")
    p.add_argument("--problems", type=int, default=400)
    p.add_argument("--first-seed", type=int, default=FIRST_SEED)
    p.add_argument("--interval", type=int, default=64)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 4])
    p.add_argument("--iterations", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                   help="loop lengths of the problems (default: the shipped family, 12 20); longer loops give "
                        "longer traces (40 48: ~1,100-1,300 generated tokens) for a model trained on them")
    p.add_argument("--mechanism", type=int, default=100, help="problems for the mechanism probe (0: skip)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few problems, one level: a smoke run")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="the factorial and H2O only (without R-KV, TOVA, recent, random)")
    p.add_argument("--cells", default=None, help="comma-separated cell names to run (default: every cell); "
                   "'headline' = rpc, the SnapKV cell, h2o, rkv, tova, recent, random")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier runs (same settings) into --out; runs nothing")
    p.add_argument("--markdown", action="store_true", help="with --merge: print the tables of docs/ablations.md")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.merge:
        result = merge(args.merge)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
        print(markdown(result)) if args.markdown else print_tables(result)
        return result
    if args.cells:
        args.cells = HEADLINE if args.cells == "headline" else tuple(args.cells.split(","))
        unknown = [n for n in args.cells if n not in cells(True)]
        if unknown:
            p.error(f"--cells: unknown {unknown}; the cells are {list(cells(True))}")
        if "rpc" not in args.cells:
            args.mechanism = 0  # the probe is RPC's own run
    torch.set_num_threads(args.threads)
    spec = EVAL_SPEC if args.iterations is None else TaskSpec(iterations=tuple(args.iterations))
    if args.quick:  # short traces, a short schedule: a smoke run of every code path (the notebook's CI run)
        args.problems, args.ratios, args.mechanism, args.batch_size = 8, [2], 4, 8
        args.interval, args.window, spec = 32, 16, TaskSpec(iterations=(6, 10))
    problems = heldout_problems(args.problems, spec=spec, start=args.first_seed)
    max_new = trace_length(spec, spec.iterations[1]) + 8
    result = {"benchmark": "design_space", "command": " ".join(["python", "benchmarks/design_space.py"] + (argv or sys.argv[1:])),
              "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
              "settings": {"problems": args.problems, "first_seed": args.first_seed, "interval": args.interval,
                           "window": args.window, "ratios": args.ratios, "iterations": list(spec.iterations),
                           "max_new_tokens": max_new},
              "models": {}}
    for path in args.models:
        label = "shipped" if path == "shipped" else os.path.basename(path.rstrip("/"))
        result["models"][label] = run_model(label, path, args, problems, max_new)
        result["comparisons"] = compare(result)
        result["agreement"] = agreement(result)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
