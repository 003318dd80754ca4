"""The loop-trace task: small programs whose step-by-step evaluation is a long generated trace.

Why this task. RPC rests on one hypothesis: in a reasoning trace, the tokens that the most recent
queries attend to are the ones the rest of the trace will need. A task that tests it must have a
final answer that depends on a few tokens written far back *by the model itself* (not in the
prompt, which RPC never compresses), buried in a long trace that is mostly dead weight. Here:

* the prompt is a program: constants defined by a chain of arithmetic (``k = 7 + 6 ; m = k * 3``),
  state registers with initial values (``b 4 ; c 0``), an input tape of numbered digits
  (``input #1 4 #2 0 #3 7 ...``) and a loop body of assignments that combine the registers, the
  current input digit ``x`` and the constants (``b = x + k ; c = c - m ; b = c + x ; c = m``);
* the trace first evaluates the constants once (``k = 7 + 6 : k 3 ; m = k * 3 : m 9 ;``), the only
  place their values are written, then runs the loop, one line per iteration: the iteration number
  and its input digit, then every assignment with the current values of the registers it reads
  restated, and its result (``#7 x 0 : b = x 0 + k : b 3 ; c = c 4 - m : c 5 ;``), then
  ``answer : N``. A value is always written right after its name (``b 3``), as in a reasoning trace
  that restates the quantities it works with;
* constants are read by every iteration but never restated: their values stay where they were
  written, at the start of the trace, and the model must attend back to them all along; register
  values of older iterations are superseded and never read again, so most of the trace is dead
  weight, as in a long chain of thought;
* the input tape keeps every register's trajectory aperiodic, so a model cannot shortcut the
  constants by continuing an earlier stretch of its own trace;
* the answer is the final value of one register, so one misread constant anywhere spoils it.

All arithmetic is modulo 10 (values are digits); a random guess is right 10% of the time. A loop
line has 4 tokens plus 7 to 11 per assignment, so the number of iterations tunes the trace from
~100 to several thousand tokens (``trace_length``,
``TaskSpec.for_length``). Everything is plain Python and deterministic given a seed:
``make_problem(seed, spec)``.
"""

from __future__ import annotations

import dataclasses
import random
import re

__all__ = [
    "TaskSpec",
    "Problem",
    "make_problem",
    "problems",
    "extract_answer",
    "trace_length",
    "VOCAB_WORDS",
    "MAX_ITERATIONS",
    "REGISTER_NAMES",
]

MAX_ITERATIONS = 400
INPUT = "x"  # the register that holds the current input digit
REGISTER_NAMES = tuple("abcdefghjkmnpqrstuvwyz")  # no i, l, o (they read like digits); x is the input
CONSTANT_NAMES = ("k", "m", "n", "p")  # fixed names (TaskSpec.random_names=False): constants ...
STATE_NAMES = ("a", "b", "c", "d")  # ... and registers
OPS = ("+", "-", "*")
BODY_OPS = ("+", "-")  # bijective in each operand: no state collapses to a fixed point
COPY_PROBABILITY = 0.3  # share of body statements that copy a constant (t = k)
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
KEYWORDS = ("=", ";", ":", "loop", "input", "?", "answer", "trace", INPUT)
# Digits are values; iteration numbers are words of their own (``#1`` .. ``#400``), so that an
# iteration number is never confused with a value and appears once in the prompt and once in the trace.
VOCAB_WORDS = (SPECIAL + KEYWORDS + OPS + REGISTER_NAMES + tuple(str(n) for n in range(10))
               + tuple(f"#{n}" for n in range(1, MAX_ITERATIONS + 1)))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Difficulty of a problem family.

    iterations: loop iterations, an inclusive range (the trace length grows linearly with it).
    constants: constants defined by a chain of arithmetic and read by the loop body.
    registers: state registers updated by the loop body.
    statements: assignments in the loop body.
    random_names: draw the names of constants and registers at random from ``REGISTER_NAMES``
        (harder to learn: the model must bind arbitrary names) instead of the fixed ``k, m, ...`` for
        constants and ``a, b, ...`` for registers.
    """

    iterations: tuple[int, int] = (12, 20)
    constants: int = 2
    registers: int = 2
    statements: int = 2
    random_names: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.iterations
        if not (1 <= lo <= hi <= MAX_ITERATIONS):
            raise ValueError(f"TaskSpec.iterations: expected 1 <= lo <= hi <= {MAX_ITERATIONS}, got {self.iterations}")
        if not 1 <= self.constants <= 4:
            raise ValueError(f"TaskSpec.constants: expected 1..4, got {self.constants}")
        if not 1 <= self.registers <= 4:
            raise ValueError(f"TaskSpec.registers: expected 1..4, got {self.registers}")
        if not max(self.constants, self.registers) <= self.statements <= 6:
            raise ValueError(
                f"TaskSpec.statements: expected max(constants, registers)..6 (every constant is read and every "
                f"register written), got {self.statements}"
            )

    @classmethod
    def for_length(cls, tokens: int, **kw) -> "TaskSpec":
        """The spec (fixed iteration count) whose traces are closest to ``tokens`` long."""
        base = cls(**kw)
        per_iter = 4 + 11 * base.statements
        n = max(1, min(MAX_ITERATIONS, round((tokens - trace_length(base, 0)) / per_iter)))
        return dataclasses.replace(base, iterations=(n, n))


def trace_length(spec: TaskSpec, iterations: int) -> int:
    """Most tokens the model generates for a problem of ``spec`` with ``iterations`` iterations
    (``</s>`` included): the count when every statement reads two registers (``t = r 5 + q 2 : t 7 ;``,
    11 tokens; one that reads a constant has 10, a copy 7; ``Problem.trace_tokens`` is exact)."""
    return 9 * spec.constants + iterations * (4 + 11 * spec.statements) + 3 + 1


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` (ends with the ``trace`` marker), the ``trace`` a correct model
    writes (ends with ``answer : N``; ``</s>`` follows) and the ``answer`` digit as a string."""

    seed: int
    prompt: str
    trace: str
    answer: str
    iterations: int

    @property
    def trace_tokens(self) -> int:
        """Tokens a correct model generates: the trace plus ``</s>``."""
        return len(self.trace.split()) + 1

    def to_json(self) -> dict:
        return {"problem": self.prompt, "answer": self.answer, "seed": self.seed, "iterations": self.iterations}


def _apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return (x + y) % 10
    if op == "-":
        return (x - y) % 10
    return (x * y) % 10


def _eval(stmt, values: dict) -> int:
    """Value of one statement: ``(target, a, op, b)`` is ``target = a op b``; ``op`` None is the copy
    ``target = a``."""
    _, a, op, b = stmt
    return values[a] if op is None else _apply(op, values[a], values[b])


def _run(body, values: dict, tape) -> dict:
    values = dict(values)
    for d in tape:
        values[INPUT] = d
        for stmt in body:
            values[stmt[0]] = _eval(stmt, values)
    return values


def _trajectories(body, values: dict, tape) -> dict:
    values = dict(values)
    seen: dict = {}
    for d in tape:
        values[INPUT] = d
        for stmt in body:
            values[stmt[0]] = _eval(stmt, values)
            seen.setdefault(stmt[0], []).append(values[stmt[0]])
    return seen


def _is_live(body, regs, consts, values, tape, asked) -> bool:
    # Every register's trajectory must follow the input: shifting every input digit changes it.
    # (A register that ignores the input is periodic, and a model could continue it by copying its
    # own older lines instead of reading the constants.)
    base = _trajectories(body, values, tape)
    shifted = _trajectories(body, values, [(d + 1) % 10 for d in tape])
    if any(r not in base or base[r] == shifted[r] for r in regs):
        return False
    # Reading any constant as another value must change the answer for most of those values.
    final = _run(body, values, tape)[asked]
    for k in consts:
        differ = sum(_run(body, {**values, k: v}, tape)[asked] != final for v in range(1, 10) if v != values[k])
        if differ < 6:
            return False
    return True


def make_problem(seed: int, spec: TaskSpec = TaskSpec()) -> Problem:
    """The problem of ``seed`` in family ``spec`` (deterministic)."""
    rng = random.Random(seed)
    if spec.random_names:
        names = rng.sample(REGISTER_NAMES, spec.constants + spec.registers)
        consts, regs = names[: spec.constants], names[spec.constants :]
    else:
        consts, regs = list(CONSTANT_NAMES[: spec.constants]), list(STATE_NAMES[: spec.registers])
    iterations = rng.randint(*spec.iterations)

    values: dict[str, int] = {}
    prompt: list[str] = []
    const_lines: list[list[str]] = []
    # Constants: the first from two literals, each later one from the previous constant and a
    # literal. None is 0 (a zero constant would leave its statements without effect).
    for j, k in enumerate(consts):
        while True:
            op = rng.choice(OPS)
            lit = rng.randint(2, 9)
            left = rng.randint(2, 9) if j == 0 else values[consts[j - 1]]
            if _apply(op, left, lit) != 0:
                break
        line = [k, "=", str(left) if j == 0 else consts[j - 1], op, str(lit)]
        values[k] = _apply(op, left, lit)
        prompt += line + [";"]
        const_lines.append(line + [":", k, str(values[k]), ";"])
    for r in regs:
        values[r] = rng.randint(0, 9)
        prompt += [r, str(values[r]), ";"]
    tape = [rng.randint(0, 9) for _ in range(iterations)]
    prompt += ["input"]
    for t, d in enumerate(tape, 1):
        prompt += [f"#{t}", str(d)]
    prompt += [";"]
    # Loop body: statement s writes register s (then random ones). The first statements each read
    # one constant (every constant is used), as ``t = r op k`` (r a register or the input) or, with
    # probability ``COPY_PROBABILITY``, as the copy ``t = k``; later ones read two registers
    # (``t = r op q``) or a constant. Drawn again until every register follows the input (no
    # periodic register that a model could continue by copying its older lines) and reading any
    # constant wrongly changes the answer.
    sources = regs + [INPUT]
    for _attempt in range(100_000):
        # The asked register is drawn with the body: with very few iterations some registers cannot
        # depend on every constant whatever the body, and a fixed choice could never be satisfied.
        asked = rng.choice(regs)
        body = []
        for s in range(spec.statements):
            target = regs[s] if s < len(regs) else rng.choice(regs)
            if s < len(consts) or rng.random() < 0.5:
                const = consts[s] if s < len(consts) else rng.choice(consts)
                if rng.random() < COPY_PROBABILITY:
                    body.append((target, const, None, None))
                else:
                    body.append((target, rng.choice(sources), rng.choice(BODY_OPS), const))
            else:
                body.append((target, rng.choice(sources), rng.choice(BODY_OPS), rng.choice(sources)))
        if _is_live(body, regs, consts, values, tape, asked):
            break
    else:  # pragma: no cover - not reached for any valid TaskSpec (tests draw thousands of seeds)
        raise RuntimeError(f"make_problem: no loop body satisfies the constraints for seed {seed}, {spec}")
    prompt += ["loop", f"#{iterations}", ":"]
    for target, a, op, b in body:
        prompt += [target, "=", a] + ([] if op is None else [op, b]) + [";"]
    prompt += ["?", asked, "trace"]

    values = dict(values)
    trace: list[str] = []
    for line in const_lines:
        trace += line
    for t, d in enumerate(tape, 1):
        values[INPUT] = d
        trace += [f"#{t}", INPUT, str(d), ":"]
        for stmt in body:
            target, a, op, b = stmt
            # Registers and the input are restated with their values; constants never are.
            def operand(name):
                return [name] if name in consts else [name, str(values[name])]

            expr = operand(a) if op is None else operand(a) + [op] + operand(b)
            values[target] = _eval(stmt, values)
            trace += [target, "="] + expr + [":", target, str(values[target]), ";"]
    answer = str(values[asked])
    trace += ["answer", ":", answer]
    return Problem(seed=seed, prompt=" ".join(prompt), trace=" ".join(trace), answer=answer, iterations=iterations)


def problems(seeds, spec: TaskSpec = TaskSpec()) -> list[Problem]:
    """Problems for an iterable of seeds (e.g. ``range(1_000_000, 1_000_200)`` for a held-out set)."""
    return [make_problem(int(s), spec) for s in seeds]


_ANSWER = re.compile(r"answer\s*:\s*(-?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the last ``answer :`` in a generated trace, or None."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None
