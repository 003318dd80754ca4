"""The loop-trace task (rpc_py.tracemodel.task) and its tokenizer: determinism, the trace is the
program's true evaluation, lengths, held-out seeds, and the properties that make it a test of KV
eviction (the answer depends on every constant; registers follow the input)."""

from __future__ import annotations

import re

import pytest

from rpc_py.tracemodel import HELD_OUT_START, heldout_problems
from rpc_py.tracemodel.task import (
    MAX_ITERATIONS,
    TaskSpec,
    VOCAB_WORDS,
    extract_answer,
    make_problem,
    trace_length,
)


def _parse(prompt: str):
    """An independent reader of the prompt's little language."""
    words = prompt.split()
    defs, i = [], 0
    while words[i] != "input":
        j = words.index(";", i)
        defs.append(words[i:j])
        i = j + 1
    j = words.index(";", i)
    tape = [int(words[k]) for k in range(i + 2, j, 2)]
    i = j + 1
    assert words[i] == "loop"
    n = int(words[i + 1].lstrip("#"))
    i += 3
    body = []
    while words[i] != "?":
        j = words.index(";", i)
        body.append(words[i:j])
        i = j + 1
    return defs, tape, n, body, words[i + 1]


def _run(defs, tape, n, body, asked, override=None):
    """Evaluate; ``override`` replaces constants' values as the loop reads them (after all definitions).
    Returns (constants, assignments, env)."""
    env, consts = {}, []
    for target, *expr in defs:
        if len(expr) == 1:  # a register's initial value: "b 4"
            env[target] = int(expr[0])
        else:
            expr = expr[1:]  # drop "="
            a, op, b = (env[w] if w in env else int(w) for w in (expr[0],)), expr[1], expr[2]
            a = next(a)
            b = env[b] if b in env else int(b)
            env[target] = eval(f"({a} {op} {b}) % 10")
            consts.append((target, env[target]))
    env.update(override or {})  # what the loop reads (a model that misremembers a constant)
    values = []
    for t in range(n):
        env["x"] = tape[t]
        for stmt in body:
            if len(stmt) == 3:  # a copy: "t = k"
                target, _, a = stmt
                env[target] = env[a]
            else:
                target, _, a, op, b = stmt
                env[target] = eval(f"({env[a]} {op} {env[b]}) % 10")
            values.append((target, env[target]))
    return consts, values, env


@pytest.mark.parametrize("seed", [0, 1, 2, 17, 123456])
def test_trace_is_the_programs_evaluation(seed):
    spec = TaskSpec(iterations=(3, 9))
    p = make_problem(seed, spec)
    assert p == make_problem(seed, spec)  # deterministic
    defs, tape, n, body, asked = _parse(p.prompt)
    assert n == p.iterations == len(tape)
    consts, values, env = _run(defs, tape, n, body, asked)
    assert p.answer == str(env[asked])
    written = [(t, int(v)) for t, v in re.findall(r": (\w) (\d) ;", p.trace)]
    assert written == consts + values  # constants first, then every assignment, each "name value"
    # every register or input operand is restated with its current value; constants never are
    const_names = {c for c, _ in consts}
    for name, value in re.findall(r"(\w) (\d) [-+:]", p.trace.split("#1 ", 1)[1]):
        assert name not in const_names
    assert extract_answer(p.trace) == p.answer
    assert p.prompt.endswith("trace") and p.trace.endswith(f"answer : {p.answer}")


def test_trace_length_formula_and_for_length():
    for seed in range(20):
        spec = TaskSpec(iterations=(1, 30), constants=1 + seed % 3, registers=1 + seed % 2, statements=3 + seed % 2)
        p = make_problem(seed, spec)
        assert p.trace_tokens == len(p.trace.split()) + 1
        lower = 9 * spec.constants + p.iterations * (4 + 7 * spec.statements) + 4  # all copies
        assert lower <= p.trace_tokens <= trace_length(spec, p.iterations)
    for tokens in (300, 1000, 3000):
        spec = TaskSpec.for_length(tokens)
        assert abs(trace_length(spec, spec.iterations[0]) - tokens) <= 4 + 11 * spec.statements


def test_answer_depends_on_every_constant_and_registers_follow_input():
    """The generator redraws programs until reading any constant as another non-zero value changes
    the answer for at least 6 of the 8 other values (a model that lost a constant is usually wrong),
    and until every register's trajectory depends on the input tape (no periodic register that a
    model could continue by copying its own older lines)."""
    spec = TaskSpec(iterations=(5, 8))
    for seed in range(40):
        p = make_problem(seed, spec)
        defs, tape, n, body, asked = _parse(p.prompt)
        consts, values, env = _run(defs, tape, n, body, asked)
        assert len(consts) == spec.constants and all(v != 0 for _, v in consts)
        for name, value in consts:
            changed = sum(_run(defs, tape, n, body, asked, {name: v})[2][asked] != env[asked]
                          for v in range(1, 10) if v != value)
            assert changed >= 6, (seed, name, changed)
        for reg in {stmt[0] for stmt in body}:
            trajectories = set()
            for first in range(10):
                _, vals, _ = _run(defs, [first] + tape[1:], n, body, asked)
                trajectories.add(tuple(v for t, v in vals if t == reg))
            assert len(trajectories) > 1, (seed, reg)


def test_vocabulary_and_tokenizer_round_trip():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from rpc_py.tracemodel.tokenizer import build_tokenizer

    tok = build_tokenizer()
    assert len(tok) == len(VOCAB_WORDS) and len(set(VOCAB_WORDS)) == len(VOCAB_WORDS)
    p = make_problem(5, TaskSpec(iterations=(MAX_ITERATIONS - 2, MAX_ITERATIONS)))
    ids = tok(p.prompt + " " + p.trace).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == p.prompt + " " + p.trace


def test_heldout_problems_use_the_heldout_range():
    probs = heldout_problems(5)
    assert [p["seed"] for p in probs] == list(range(HELD_OUT_START, HELD_OUT_START + 5))
    assert all(set(p) >= {"problem", "answer", "iterations"} for p in probs)
    fixed = heldout_problems(3, trace_tokens=600)
    assert len({p["iterations"] for p in fixed}) == 1


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="iterations"):
        TaskSpec(iterations=(0, 3))
    with pytest.raises(ValueError, match="iterations"):
        TaskSpec(iterations=(5, MAX_ITERATIONS + 1))
    with pytest.raises(ValueError, match="statements"):
        TaskSpec(constants=3, statements=2)
    with pytest.raises(ValueError, match="constants"):
        TaskSpec(constants=0)
