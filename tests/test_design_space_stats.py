"""The statistics of the ablations (``rpc_py.accuracy``: the exact McNemar test, Holm's adjustment) and
of benchmarks/design_space.py (the verdict of each comparison across models, the merge of runs made in
parallel), checked against hand-computed values and brute-force enumeration, not against the formulas
the code uses."""

import itertools
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import design_space  # noqa: E402
from rpc_py import accuracy  # noqa: E402


def _mcnemar_by_enumeration(b, c):
    """P(a fair split of the n = b + c discordant pairs is at least as lopsided as the one seen),
    counting every one of the 2**n outcomes."""
    n = b + c
    if n == 0:
        return 1.0
    seen = abs(b - n / 2)
    extreme = sum(1 for bits in itertools.product((0, 1), repeat=n) if abs(sum(bits) - n / 2) >= seen)
    return extreme / 2**n


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (3, 10), (7, 7), (12, 1), (5, 6), (0, 14)])
def test_mcnemar_matches_enumeration(b, c):
    assert accuracy.mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_enumeration(b, c), abs=1e-12)


def test_holm_hand_computed():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone: 0.06
    assert accuracy.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert accuracy.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert accuracy.holm([]) == []


def _result(models):
    """A run with, per model, RPC and one cell on 20 problems: cell_only / rpc_only discordant pairs."""
    out = {"models": {}}
    for label, (cell_only, rpc_only) in models.items():
        rpc = [True] * 10 + [False] * 10
        cell = list(rpc)
        for i in range(rpc_only):
            cell[i] = False
        for i in range(cell_only):
            cell[10 + i] = True
        level = {"rpc": {"correct": rpc, "k": sum(rpc), "n": 20}, "x": {"correct": cell, "k": sum(cell), "n": 20}}
        out["models"][label] = {"full": {"correct": [True] * 20}, "levels": {"2": level}}
    return out


def test_agreement_verdicts():
    res = _result({"a": (10, 0), "b": (9, 0), "c": (1, 1)})
    res["comparisons"] = design_space.compare(res)
    by_model = {r["model"]: r for r in res["comparisons"]}
    assert (by_model["a"]["cell_only"], by_model["a"]["rpc_only"]) == (10, 0)
    # 10 vs 0 discordant: p = 2/1024, Holm x3 -> significant; 9 vs 0: p = 2/512, x2 -> significant; 1 vs 1: p = 1
    assert by_model["a"]["significant_holm_0.05"] and by_model["b"]["significant_holm_0.05"]
    assert not by_model["c"]["significant_holm_0.05"]
    (row,) = design_space.agreement(res)
    assert {k: v["verdict"] for k, v in row["models"].items()} == {"a": "+", "b": "+", "c": "="}
    assert row["agree"] == "differ"
    res = _result({"a": (0, 10), "b": (0, 9)})
    res["comparisons"] = design_space.compare(res)
    assert design_space.agreement(res)[0]["agree"] == "all -"


def test_merge(tmp_path):
    settings = {"problems": 20, "ratios": [2]}
    paths = []
    for label, split in (("m1", (10, 0)), ("m2", (0, 0))):
        run = dict(_result({label: split}), settings=settings, command=f"run {label}", machine={"threads": 1})
        paths.append(tmp_path / f"{label}.json")
        paths[-1].write_text(json.dumps(run))
    merged = design_space.merge([str(p) for p in paths])
    assert list(merged["models"]) == ["m1", "m2"]
    assert len(merged["comparisons"]) == 2 and merged["agreement"][0]["agree"] == "differ"
    assert merged["command"] == "run m1 ; run m2"
    assert merged["machines"] == [{"threads": 1}, {"threads": 1}]
    # a merged result is itself an input (a model added later): its command and machine lists carry over
    again = tmp_path / "merged.json"
    again.write_text(json.dumps(merged))
    m3 = tmp_path / "m3.json"
    m3.write_text(json.dumps(dict(_result({"m3": (0, 4)}), settings=settings, command="run m3", machine={"threads": 2})))
    more = design_space.merge([str(again), str(m3)])
    assert list(more["models"]) == ["m1", "m2", "m3"] and len(more["comparisons"]) == 3
    assert more["command"] == "run m1 ; run m2 ; run m3"
    assert more["machines"] == [{"threads": 1}, {"threads": 1}, {"threads": 2}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(_result({"m3": (0, 0)}), settings={"problems": 8}, command="x", machine={})))
    with pytest.raises(ValueError, match="bad.json: settings"):
        design_space.merge([str(paths[0]), str(bad)])
    with pytest.raises(ValueError, match="model 'm1' c=2 cell 'rpc' is in more than one run"):
        design_space.merge([str(paths[0]), str(paths[0])])
    # runs from before --iterations used the shipped family: they merge with one that records it ...
    m4 = tmp_path / "m4.json"
    m4.write_text(json.dumps(dict(_result({"m4": (0, 1)}), settings=dict(settings, iterations=[12, 20]),
                                  command="run m4", machine={})))
    assert design_space.merge([str(paths[0]), str(m4)])["settings"]["iterations"] == [12, 20]
    # ... and not with a run on longer loops
    m4.write_text(json.dumps(dict(_result({"m4": (0, 1)}), settings=dict(settings, iterations=[40, 48]),
                                  command="run m4", machine={})))
    with pytest.raises(ValueError, match="m4.json: settings"):
        design_space.merge([str(paths[0]), str(m4)])


def test_merge_combines_cells_of_one_model(tmp_path):
    """Cells of one model run separately (``--cells``) come together; the comparisons need RPC's run."""
    settings = {"problems": 20, "ratios": [2]}
    base = _result({"m": (10, 0)})
    rpc_only = {"models": {"m": {"full": base["models"]["m"]["full"], "levels": {"2": {"rpc": base["models"]["m"]["levels"]["2"]["rpc"]}},
                                 "mechanism": {"share_below_0.1": 0.5}}}}
    x_only = {"models": {"m": {"full": base["models"]["m"]["full"], "levels": {"2": {"x": base["models"]["m"]["levels"]["2"]["x"]}}}}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, run in ((a, rpc_only), (b, x_only)):
        path.write_text(json.dumps(dict(run, settings=settings, command=path.name, machine={})))
    assert design_space.compare(x_only) == []  # no RPC in that run: nothing to compare with
    merged = design_space.merge([str(a), str(b)])
    assert sorted(merged["models"]["m"]["levels"]["2"]) == ["rpc", "x"]
    assert merged["models"]["m"]["mechanism"] == {"share_below_0.1": 0.5}
    (row,) = merged["comparisons"]
    assert (row["cell"], row["cell_only"], row["rpc_only"]) == ("x", 10, 0)
    x_only["models"]["m"]["full"] = {"correct": [False] * 20}
    b.write_text(json.dumps(dict(x_only, settings=settings, command="b", machine={})))
    with pytest.raises(ValueError, match="other full-KV answers"):
        design_space.merge([str(a), str(b)])


def test_markdown_tables_come_from_the_result():
    res = _result({"a": (10, 0), "b": (0, 0)})
    for label in ("a", "b"):
        m = res["models"][label]
        m["full"]["pass@1"] = 1.0
        for cell in m["levels"]["2"].values():
            cell["ci95"] = (0.25, 0.75)
    res["comparisons"] = design_space.compare(res)
    res["agreement"] = design_space.agreement(res)
    text = design_space.markdown(res)
    assert "| rule | a, c=2 | b, c=2 |" in text
    assert "| rpc | 10 (25%-75%) | 10 (25%-75%) |" in text
    assert "| 2 | x | + 20 vs 10" in text and "| differ |" in text
