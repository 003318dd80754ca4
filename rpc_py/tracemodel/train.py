"""Train the loop-trace model from scratch on CPU: ``python -m rpc_py.tracemodel.train --out DIR``.

Reproducible: the problems come from ``task.make_problem`` with seeds drawn from one seeded
generator, the weights are initialised from ``--seed``, and the schedule is a function of the step.
Training problems use seeds below ``HELD_OUT_START``; evaluation (here and in the tests) uses seeds
from ``HELD_OUT_START`` on, so the reported accuracy is on problems never trained on.

Training runs in three stages. First ``--induction-steps`` steps of a plain recall task (a random
word sequence, then the same sequence again): on short contexts attention learns quickly to find an
earlier occurrence of the current token and copy what followed it, which every read of the loop-trace
task needs; trained on the traces alone, the model sat for thousands of steps at the loss of guessing
every value (measured: no value token above chance after 1,500 steps; with the warm-up, restated values,
input digits and register reads were all predicted exactly 100 steps after it). Then loop traces of at
most 4 iterations, then up to 24 (``--phases``), so that the arithmetic with the far-away constants is
learnt on short traces first. The loss covers the trace and ``</s>`` only (the prompt is random and not
predicted). Float32: bfloat16 autocast was not faster for a model this small on CPU.

A run longer than one sitting: ``--max-minutes M`` stops it with a checkpoint (``resume.pt`` beside the
weights: optimizer state, step, data order, RNG; also written at every ``--eval-every``, so a killed
run loses at most that many steps), and the same command with ``--resume`` continues it to exactly the
weights of an uninterrupted run (tested); ``training.json`` says ``"complete"`` and lists every command.

The shipped model: ``python -m rpc_py.tracemodel.train --out rpc_py/tracemodel/weights`` (the
defaults; ``weights/training.json`` records the arguments, the time, the machine and the loss curve;
it was monitored on the first 8 held-out seeds, which later runs keep apart: ``MONITOR_START``).
The models of ``benchmarks/trace_models/`` are the same recipe with other ``--seed`` values, so that
conclusions rest on more than one trained model. ``--heads``/``--kv-heads`` change the attention shape
(head size = hidden / heads). Head size 32 at the default width (``--heads 4 --kv-heads 2``; vLLM's CPU
attention needs a head size of at least 32) did not leave the plateau: two seeds, one thread each,
still at loss 0.4-0.5 after 3,700 of 8,000 steps (teacher-forced token accuracy 0.83 and 0.81 at step
3,000, no exact trace), where the default 8 heads of 16 pass it by step ~1,500 (loss 0.017, token
accuracy 0.97 at step 1,950). With 8 heads of 32 (``--hidden 256 --intermediate 1024 --heads 8 --kv-heads 2``,
3.9M parameters, about four times the compute: ~2,000-2,600 tokens/s on one thread) the run does leave
it (token accuracy 0.94 at step 1,700) but then creeps: 0.984 at step 4,950, 0.988-0.991 from there to
step 8,000, no exact monitor trace; 180 minutes in five sittings (``benchmarks/trace_models/head32``; with
the full cache it answers 14% of the design-space problems).

Longer traces (``--min-iterations``, ``--monitor-iterations``; e.g. ``--init rpc_py/tracemodel/weights
--phases 1.0:48 --min-iterations 24 --monitor-iterations 40:48 --induction-steps 0``) fine-tune a trained
model on loops longer than it has seen. The shipped model does not generalise past its 24 iterations
(greedy, full cache: 2 of 6 problems at 24 iterations, 0 of 6 at 40). Two such fine-tunes of the shipped
model towards traces of 1,000-1,300 tokens (40-48 iterations) did not learn them (2026-12-05, one thread,
shared 2-core Xeon): 1,200 steps at ``--lr 1e-3 --min-iterations 24`` (16 min) reached a teacher-forced
token accuracy of 0.980 on 40-48 iterations (no exact trace) but answered 4 of 40 such problems and lost the
short ones (15 of 40 at 12-20); 2,000 steps at ``--lr 3e-4 --min-iterations 12`` (21 min, token accuracy
0.977) kept the short ones (96 of 100) and answered 7 of 100 long ones, below the ~10% of guessing the
digit. Neither was kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time

import torch

from .._report import cpu_name
from .task import MAX_ITERATIONS, TaskSpec, make_problem, trace_length
from .tokenizer import build_tokenizer

HELD_OUT_START = 1_000_000_000
# Training problems use seeds below HELD_OUT_START, evaluation (the tests, the ablations) seeds from
# HELD_OUT_START on; the accuracy monitored during training uses seeds from here on, disjoint from both.
MONITOR_START = 2_000_000_000
SPEC_DEFAULTS = dict(constants=2, registers=2, statements=2)  # TaskSpec's defaults: the shipped family


def model_config(tokenizer, layers: int = 4, hidden: int = 256, intermediate: int = 768, heads: int = 8,
                 kv_heads: int = 2):
    from transformers import LlamaConfig

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must divide hidden ({hidden}) and be a multiple of kv_heads ({kv_heads})")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode(tokenizer, problem):
    """(input ids, loss mask) of prompt + trace + ``</s>``; the mask covers trace and ``</s>``."""
    prompt = tokenizer(problem.prompt).input_ids
    trace = tokenizer(problem.trace, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + trace, [0] * len(prompt) + [1] * len(trace)


def make_batch(tokenizer, seeds, spec):
    rows = [encode(tokenizer, make_problem(s, spec)) for s in seeds]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (x, m) in enumerate(rows):
        n = len(x)
        ids[b, :n] = torch.tensor(x)
        attn[b, :n] = 1
        labels[b, :n] = torch.where(torch.tensor(m) == 1, torch.tensor(x), torch.tensor(-100))
    return ids, attn, labels


def induction_batch(tokenizer, rng: random.Random, tokens: int, length=(8, 24)):
    """A warm-up batch of the plainest recall task: a random word sequence, then the same sequence
    again (loss on the repeat). Contexts of a few dozen tokens give attention a strong gradient towards
    "find the earlier occurrence of this token, copy what followed it" (an induction head), the
    mechanism every read of the loop-trace task is built on; on long traces alone it forms slowly."""
    special = set(tokenizer.all_special_ids)
    words = [i for i in range(len(tokenizer)) if i not in special]
    n = rng.randint(*length)
    batch = max(1, tokens // (2 * n + 1))
    ids = torch.empty((batch, 2 * n + 1), dtype=torch.long)
    for b in range(batch):
        seq = rng.sample(words, n)
        ids[b] = torch.tensor([tokenizer.bos_token_id] + seq + seq)
    labels = ids.clone()
    labels[:, : n + 2] = -100  # the first copy and the first repeated token are unpredictable
    return ids, torch.ones_like(ids), labels


def phase_max_iterations(step: int, steps: int, phases) -> int:
    """Longest loop (iterations) trained at ``step``: phases = [(fraction of steps, max iterations)]."""
    done = 0.0
    for frac, max_it in phases:
        done += frac
        if step < done * steps:
            return max_it
    return phases[-1][1]


@torch.no_grad()
def teacher_forced_accuracy(model, tokenizer, spec, seeds):
    """Fraction of trace tokens and of whole traces predicted exactly under teacher forcing."""
    model.eval()
    ids, attn, labels = make_batch(tokenizer, seeds, spec)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    ok = (logits.argmax(-1) == target) | (target == -100)
    mask = target != -100
    token_acc = ((logits.argmax(-1) == target) & mask).sum().item() / mask.sum().item()
    model.train()
    return token_acc, ok.all(-1).float().mean().item()


def save(model, tokenizer, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


RESUME_FILE = "resume.pt"
_NOT_RUN_ARGS = ("threads", "max_minutes", "resume", "log_every")


def _run_args(args) -> dict:
    """The arguments that define a run (a resumed run must repeat them)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_RUN_ARGS}


def _load_resume(args) -> dict:
    path = os.path.join(args.out, RESUME_FILE)
    if not os.path.exists(path):
        raise SystemExit(f"--resume: no checkpoint {path} (the run finished, or never reached a checkpoint)")
    state = torch.load(path, weights_only=False)
    differ = {k: (v, state["args"].get(k)) for k, v in _run_args(args).items() if state["args"].get(k) != v}
    if differ:
        raise SystemExit("--resume: arguments differ from the run's own: "
                         + ", ".join(f"--{k.replace('_', '-')} {new} (run: {old})" for k, (new, old) in differ.items()))
    return state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpc_py.tracemodel.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--tokens-per-batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=8, help="query heads (head size = hidden / heads)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--phases", default="0.2:4,0.8:24",
                   help="curriculum: fraction:max_iterations,... (max iterations per phase)")
    p.add_argument("--min-iterations", type=int, default=None,
                   help="shortest loop drawn as a batch's longest (default 1): with --init, train on long "
                        "traces only")
    p.add_argument("--monitor-iterations", default=None,
                   help="LO:HI, the loop lengths of the monitor problems (default 12:20, the shipped family)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--induction-steps", type=int, default=400,
                   help="warm-up steps on the repeated-sequence recall task before the loop traces")
    p.add_argument("--init", default=None, help="start from the weights in this folder (a new schedule from step 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped (--max-minutes or a killed process): "
                        "weights, optimizer, step and data order from its last checkpoint; the other "
                        "arguments must be the run's own (--threads, --max-minutes may differ)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (not faster than float32 for the default size on the 2-core CPU it was trained on)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop early, resumable with --resume (the schedule still ends at --steps)")
    args = p.parse_args(argv)
    state = _load_resume(args) if args.resume else None

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    phases = [(float(f), int(m)) for f, m in (x.split(":") for x in args.phases.split(","))]
    if not all(1 <= m <= MAX_ITERATIONS for _, m in phases):
        raise SystemExit(f"--phases: max iterations must be in 1..{MAX_ITERATIONS}")
    min_it = 1 if args.min_iterations is None else args.min_iterations
    if not 1 <= min_it <= MAX_ITERATIONS:
        raise SystemExit(f"--min-iterations: expected 1..{MAX_ITERATIONS}, got {min_it}")
    try:  # default: the shipped family (TaskSpec's iterations)
        mon_lo, mon_hi = ((int(x) for x in args.monitor_iterations.split(":")) if args.monitor_iterations
                          else TaskSpec(**SPEC_DEFAULTS).iterations)
    except ValueError:
        raise SystemExit(f"--monitor-iterations: expected LO:HI, got {args.monitor_iterations!r}") from None
    if not 1 <= mon_lo <= mon_hi <= MAX_ITERATIONS:
        raise SystemExit(f"--monitor-iterations: expected 1 <= LO <= HI <= {MAX_ITERATIONS}, got {args.monitor_iterations}")

    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = model_config(tokenizer, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads)
    init = args.out if state is not None else args.init
    model = LlamaForCausalLM(config) if init is None else LlamaForCausalLM.from_pretrained(init)
    model.set_attn_implementation("sdpa")
    model.train()
    n_params = sum(t.numel() for t in model.parameters())
    decay = [t for n, t in model.named_parameters() if t.dim() >= 2]
    no_decay = [t for n, t in model.named_parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    eval_spec = TaskSpec(iterations=(mon_lo, mon_hi), **SPEC_DEFAULTS)
    eval_seeds = list(range(MONITOR_START, MONITOR_START + 8))  # disjoint from training and evaluation seeds
    log = []
    t0 = time.time()
    tokens_seen = 0
    first_step, minutes_before, commands = 0, 0.0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        first_step, tokens_seen, log = state["step"], state["tokens"], state["log"]
        minutes_before, commands = state["minutes"], state["commands"]
        t0 -= 60 * minutes_before  # elapsed time counts every part of the run
        print(f"resuming {args.out} at step {first_step} ({minutes_before:.1f} min so far)", flush=True)
    command = "python -m rpc_py.tracemodel.train " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = commands + [command]
    t_start = time.time()

    def checkpoint(next_step):
        save(model, tokenizer, args.out)
        torch.save({"step": next_step, "optimizer": opt.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "tokens": tokens_seen, "log": log,
                    "minutes": (time.time() - t0) / 60, "commands": commands, "args": _run_args(args)},
                   os.path.join(args.out, RESUME_FILE))

    print(f"params {n_params / 1e6:.2f}M, {args.steps} steps, {args.tokens_per_batch} tokens/batch, "
          f"threads {args.threads}, bf16 {args.bf16}", flush=True)
    step = first_step - 1  # the last step done
    for step in range(first_step, args.steps):
        max_it = phase_max_iterations(step, args.steps, phases)
        # One length bucket per batch (little padding): iterations uniform in [lo, hi].
        hi = rng.randint(min(min_it, max_it), max_it)
        lo = max(1, int(hi * 0.8))
        spec = TaskSpec(iterations=(lo, hi), **SPEC_DEFAULTS)
        seq = trace_length(spec, hi) + 2 * hi + 50
        batch = max(1, args.tokens_per_batch // seq)
        seeds = [rng.randrange(HELD_OUT_START) for _ in range(batch)]
        if step < args.induction_steps:
            ids, attn, labels = induction_batch(tokenizer, rng, args.tokens_per_batch)
        else:
            ids, attn, labels = make_batch(tokenizer, seeds, spec)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += int(attn.sum())
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step:5d}  loss {loss.item():.4f}  max_it {max_it:3d}  batch {batch:3d}x{ids.shape[1]:4d}  "
                  f"lr {lr_at(step):.2e}  {tokens_seen / el:.0f} tok/s  {el / 60:.1f} min", flush=True)
            log.append({"step": step, "loss": loss.item(), "minutes": el / 60})
        last = step == args.steps - 1
        evaluated = (step + 1) % args.eval_every == 0 or last
        if evaluated:
            tok_acc, seq_acc = teacher_forced_accuracy(model, tokenizer, eval_spec, eval_seeds)
            print(f"  eval (teacher-forced, {mon_lo}-{mon_hi} iterations): token acc {tok_acc:.4f}, exact traces {seq_acc:.3f}",
                  flush=True)
            log[-1].update(token_acc=tok_acc, exact_traces=seq_acc)
        stop = not last and args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes
        if not last and (evaluated or stop):
            checkpoint(step + 1)  # resumable: at every evaluation and where --max-minutes stops the run
        if stop:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached; continue with the same "
                  f"arguments and --resume", flush=True)
            break

    complete = step >= args.steps - 1
    if complete:  # a stopped run's weights were just written by its checkpoint
        save(model, tokenizer, args.out)
        if os.path.exists(os.path.join(args.out, RESUME_FILE)):
            os.remove(os.path.join(args.out, RESUME_FILE))  # nothing left to resume
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"command": " ; ".join(commands), "complete": complete, "steps_done": step + 1,
                   "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version()},
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "args": vars(args), "params": n_params, "minutes": (time.time() - t0) / 60,
                   "tokens": tokens_seen, "torch": torch.__version__, "log": log}, f, indent=1)
    print(f"saved to {args.out} after {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
