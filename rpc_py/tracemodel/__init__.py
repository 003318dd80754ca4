"""The loop-trace model: a small decoder trained in this project to write long reasoning-like traces.

``load()`` returns ``(model, tokenizer)`` from the folder shipped inside the package
(``rpc_py/tracemodel/weights``: a stock transformers Llama checkpoint in safetensors and a word-level
fast tokenizer), so ``AutoModelForCausalLM.from_pretrained(rpc_py.tracemodel.WEIGHTS)`` works too.
The task it solves is in ``rpc_py.tracemodel.task``; the script that trained it is
``python -m rpc_py.tracemodel.train`` (see ``weights/training.json`` for the exact command, time and
loss curve). ``heldout_problems`` gives evaluation problems from seeds never used in training.
"""

from __future__ import annotations

import os

from .task import Problem, TaskSpec, extract_answer, make_problem, problems, trace_length

__all__ = ["WEIGHTS", "EVAL_SPEC", "HELD_OUT_START", "load", "heldout_problems", "TaskSpec", "Problem",
           "make_problem", "problems", "extract_answer", "trace_length"]

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
HELD_OUT_START = 1_000_000_000  # training draws seeds below this; evaluation starts here
EVAL_SPEC = TaskSpec()  # the family the shipped model was trained on: 12-20 iterations, ~300-500 generated tokens


def load(dtype=None, *, path: str | None = None, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of the shipped loop-trace model, in eval mode, float32 unless ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = path or WEIGHTS
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(f"rpc_py.tracemodel: no model.safetensors in {folder}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32,
                                                 attn_implementation=attn_implementation).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    return model, tokenizer


def heldout_problems(count: int, *, spec: TaskSpec | None = None, trace_tokens: int | None = None,
                     start: int = HELD_OUT_START) -> list[dict]:
    """``count`` held-out problems as harness records (``problem``, ``answer``, ``seed``,
    ``iterations``). ``trace_tokens`` picks the fixed-length family closest to that many generated
    tokens; otherwise ``spec`` (default ``EVAL_SPEC``)."""
    if trace_tokens is not None:
        spec = TaskSpec.for_length(trace_tokens)
    spec = spec or EVAL_SPEC
    return [make_problem(s, spec).to_json() for s in range(start, start + count)]
