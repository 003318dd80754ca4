"""What does RPC buy in end-to-end generation: decode throughput, peak memory and KV bytes.

Three configurations run in the same process, on the same model and the same prompts, interleaved
repeat by repeat (a, b, c, a, b, c, ...) so that drift (clocks, other load) hits all of them alike:

  (a) hf_dynamic  plain ``model.generate`` with transformers' default cache (a DynamicCache, passed in
                  explicitly only so that its length and bytes can be read),
  (b) rpc_off     ``rpc_py.generate(model, ..., rpc=None)``: rpc_py's cache, compression off,
  (c) rpc         ``rpc_py.generate(model, ..., rpc=RPCConfig(interval=P, window=R, ratio=c))``,
and, by default on CUDA only, the same two rpc_py configurations decoded by one captured CUDA-graph
step replayed per token (``rpc_py.hf.generate.graph_generate``):
  (d) rpc_off_graph, (e) rpc_graph. The graph loop takes no stopping criteria, so for these only the
  whole call is timed; their prefill is timed by a 1-token call of the same function and subtracted.

Every run is greedy with the end-of-sequence token disabled, so every run generates exactly
``--output`` tokens; the JSON records the count per run and the script fails if they differ.

Measured per run:
  * prefill time (from the call to the first token: for (b) and (c) this includes rpc_py's setup, the
    attention switch and the cache allocation) and decode throughput (generated tokens per second over
    the decode steps only; the first token comes from the prefill and is not counted),
  * per-step wall time and cache length (a StoppingCriteria callback runs once per step, after a
    device synchronize on CUDA),
  * peak memory at the driver level: on CUDA ``cudaMemGetInfo`` (``torch.cuda.mem_get_info``) before
    the run and after every step (device-wide, other processes included; a transient peak inside a
    step is not seen, so the allocator's ``max_memory_reserved`` is recorded beside it); on CPU the
    process RSS: VmHWM from /proc/self/status after resetting it through /proc/self/clear_refs (or the
    largest per-step VmRSS sample where that reset is not allowed),
  * KV bytes: for DynamicCache the bytes of its K/V tensors at the end (the largest it gets), for
    rpc_py the C cache's allocated peak and the bytes of the tokens it holds at the end.

``--sweep`` answers a different question cheaply: the time of one decode step as a function of the
cache length L. It fills a cache (DynamicCache, or rpc_py's cache with compression off) with L random
K/V tokens, times a few decode steps at each L, times one RPC compression of one layer at the
lengths the schedule compresses at, and integrates the step-time curve over a generation schedule
(full KV: L grows by one per token; RPC: the sawtooth ``Lp + n*T + m``) to estimate long generations.
Integrated numbers are labelled "integrated, not measured end to end" everywhere they appear. The
schedules start at L = prompt + 1, so that length is measured too when it is below ``--sweep-lengths``
(JSON ``sweep_lengths_added``; a point's ``origin`` is "requested" or "added"). A step whose L is still
outside the measured lengths (above the largest, or below with ``--sweep-exact-lengths``) is
extrapolated by a rule that errs towards a slower step (``EXTRAPOLATION_RULES``); every integrated row
says which lengths and what fraction of its steps (``extrapolated``, ``extrapolated_fraction``).

Models are built from a config with random weights (``--shape``) or loaded from local weights
(``--model PATH``). Random weights make the generated text meaningless but do not change the cost
of a step; they do change what RPC keeps (attention of a random model is diffuse).

    python benchmarks/bench_generate.py --shape tiny
    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --shape tiny --threads 1   # a shared CPU
    python benchmarks/bench_generate.py --shape r1-7b --device cuda --batch 32 --output 1024 --interval 256
    python benchmarks/bench_generate.py --shape r1-7b --device cuda --sweep --sweep-lengths 128 4096 16384
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, StoppingCriteria, StoppingCriteriaList

import rpc_py
from rpc_py.api import RPCCache, RPCConfig, compress, last_cache
from rpc_py.api import generate as rpc_generate
from rpc_py._report import cpu_name

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

CONFIGS = ("hf_dynamic", "rpc_off", "rpc", "rpc_off_graph", "rpc_graph")
LABELS = {
    "hf_dynamic": "(a) transformers DynamicCache, model.generate",
    "rpc_off": "(b) rpc_py cache, compression off (rpc=None)",
    "rpc": "(c) rpc_py cache with RPC",
    "rpc_off_graph": "(d) rpc_py, compression off, CUDA graph",
    "rpc_graph": "(e) rpc_py with RPC, CUDA graph",
}
INTEGRATED = "integrated, not measured end to end"
MIB = float(1 << 20)

# Qwen2-architecture shapes. r1-7b: DeepSeek-R1-Distill-Qwen-7B; qwq-32b: QwQ-32B.
SHAPES = {
    "tiny": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=512, vocab_size=2048, rope_theta=10000.0, max_position_embeddings=65536,
    ),
    "r1-7b": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, rope_theta=10000.0, max_position_embeddings=131072,
        rms_norm_eps=1e-6,
    ),
    "qwq-32b": dict(
        hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        intermediate_size=27648, vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
}

# Defaults that fit each shape: tiny runs on a laptop CPU in seconds; the big shapes use the paper's
# setting (batch 32, 128-token prompt, P=4096, R=32, c=4) with an output that compresses once.
DEFAULTS = {
    "tiny": dict(batch=4, output=256, interval=64, window=16, ratio=4, repeats=3,
                 sweep_lengths=[128, 256, 512, 1024], sweep_outputs=[512, 896]),
    "big": dict(batch=32, output=8192, interval=4096, window=32, ratio=4, repeats=1,
                sweep_lengths=[128, 1024, 2048, 4096, 8192, 16384], sweep_outputs=[8192, 16384]),
}


# ----------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="config-built model, random weights")
    src.add_argument("--model", help="local model directory (AutoModelForCausalLM, local_files_only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", type=int)
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens (random token ids)")
    p.add_argument("--output", type=int, help="generated tokens per sequence (EOS ignored)")
    p.add_argument("--interval", type=int, help="P: generated tokens between compressions")
    p.add_argument("--window", type=int, help="R: selector window, always-kept recent tokens")
    p.add_argument("--ratio", type=int, help="c: keep P // c tokens per interval")
    p.add_argument("--budget", type=int, help="optional hard cap on kept selected tokens")
    p.add_argument("--aggregation", choices=["all", "group"], default="all")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=None,
                   help="default: all on CUDA, the three eager ones on CPU")
    p.add_argument("--repeats", type=int, help="timed runs per configuration (median and spread)")
    p.add_argument("--warmup", type=int, default=8, help="tokens of the untimed warm-up run per configuration")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="do not start a new run or sweep point after this many seconds; skipped work is listed")
    p.add_argument("--threads", type=int, help="torch CPU threads (rpc_py's OpenMP threads: set OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="step time vs cache length, then integrate (see above)")
    p.add_argument("--sweep-lengths", type=int, nargs="+", help="cache lengths L to time")
    p.add_argument("--sweep-steps", type=int, default=8, help="timed decode steps per (cache, L)")
    p.add_argument("--sweep-outputs", type=int, nargs="+", help="generation lengths to integrate over")
    p.add_argument("--sweep-exact-lengths", action="store_true",
                   help="measure only --sweep-lengths (by default prompt + 1 is added when below them); step times "
                        "outside the measured lengths are extrapolated either way, and labelled")
    p.add_argument("--json", help="output path (default benchmarks/results/bench_generate[_sweep]_<shape>_<device>.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    if a.configs is None:
        a.configs = list(CONFIGS) if a.device == "cuda" else [c for c in CONFIGS if not c.endswith("_graph")]
    d = DEFAULTS["tiny" if (a.model is None and a.shape == "tiny") else "big"]
    for key in ("batch", "output", "interval", "window", "ratio", "repeats", "sweep_lengths", "sweep_outputs"):
        if getattr(a, key) is None:
            setattr(a, key, d[key])
    for key in ("batch", "prompt", "output", "interval", "window", "ratio", "repeats"):
        if getattr(a, key) < 1:
            p.error(f"--{key}: expected an int >= 1, got {getattr(a, key)}")
    if a.output < 2:
        p.error(f"--output: expected >= 2 (one prefill token plus at least one decode step), got {a.output}")
    a.name = "local-" + os.path.basename(os.path.normpath(a.model)) if a.model else a.shape
    if a.json is None:
        kind = "bench_generate_sweep" if a.sweep else "bench_generate"
        here = os.path.dirname(os.path.abspath(__file__))
        a.json = os.path.join(here, "results", f"{kind}_{a.name}_{a.device}.json")
    try:
        a.rpc = RPCConfig(interval=a.interval, window=a.window, ratio=a.ratio, budget=a.budget,
                          aggregation=a.aggregation)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return a


def _no_init_weights():
    """transformers' context that skips weight initialization (its module moved between 5.x)."""
    for name in ("transformers.initialization", "transformers.modeling_utils"):
        fn = getattr(_import_or_none(name), "no_init_weights", None)
        if fn is not None:
            return fn()
    return contextlib.nullcontext()


def _import_or_none(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def build_model(args):
    """The model on the device, in eval mode, sdpa attention, EOS disabled.

    Config-built models are created directly on the device in the target dtype without
    transformers' weight initialization, then filled in place with small normal noise (norm weights
    one, biases zero), so the 7B shape builds in seconds on a GPU.
    """
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
        model.to(device)
    else:
        cfg = transformers.Qwen2Config(
            **SHAPES[args.shape], tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
            initializer_range=0.02, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        )
        with device, _no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, cfg.initializer_range, generator=gen)
                elif name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.zero_()
    model.eval()
    model.set_attn_implementation("sdpa")
    gc_ = model.generation_config
    gc_.eos_token_id = None  # every run generates exactly --output tokens
    gc_.bos_token_id = None
    gc_.pad_token_id = 0
    gc_.do_sample = False
    for key in ("temperature", "top_p", "top_k"):  # silence "sampling flags with greedy" warnings
        if hasattr(gc_, key):
            setattr(gc_, key, None)
    return model


def make_prompts(model, args):
    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.prompt), generator=g)
    return ids.to(args.device), torch.ones_like(ids).to(args.device)


def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory),
                    gpu_sms=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "rpc_py": rpc_py.__version__, "backend_features": sorted(rpc_py.backend_features)}


# ---------------------------------------------------------------------------------------- memory
def _proc_status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryProbe:
    """Driver-level peak memory of one run: CUDA device memory in use, or the process RSS on CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def _used(self):
        if self.cuda:
            free, total = torch.cuda.mem_get_info()
            return total - free
        return _proc_status("VmRSS")

    def start(self):
        gc.collect()
        self.hwm_reset = False
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.hwm_reset = True
            except OSError:
                pass
        self.before = self._used()
        self.peak = self.before

    def sample(self):
        used = self._used()
        if used is not None and (self.peak is None or used > self.peak):
            self.peak = used

    def result(self):
        self.sample()
        if self.cuda:
            return {
                "source": "cudaMemGetInfo (torch.cuda.mem_get_info), sampled before the run and after every step",
                "before_bytes": self.before,
                "peak_bytes": self.peak,
                "peak_delta_bytes": self.peak - self.before,
                "torch_max_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            }
        peak, source = self.peak, "VmRSS sampled after every step"
        hwm = _proc_status("VmHWM")
        if self.hwm_reset and hwm is not None:
            peak, source = max(hwm, self.peak or 0), "VmHWM after reset via /proc/self/clear_refs"
        return {
            "source": source,
            "before_bytes": self.before,
            "peak_bytes": peak,
            "peak_delta_bytes": None if peak is None or self.before is None else peak - self.before,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # process lifetime
        }


# ------------------------------------------------------------------------------------ end to end
class StepRecorder(StoppingCriteria):
    """Called by generate once per generated token: records the time, the cache length and memory.
    Never stops generation."""

    def __init__(self, device, cache_length, memory):
        self.sync = device == "cuda"
        self.cache_length = cache_length
        self.memory = memory
        self.times, self.lengths = [], []

    def __call__(self, input_ids, scores, **kwargs):
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.lengths.append(int(self.cache_length()))
        self.memory.sample()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _cache_kwarg(model):
    """transformers renamed the forward argument ``past_key_values`` to ``cache`` in 5.2x."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _dynamic_kv_bytes(cache):
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _graph_once(model, config, ids, mask, new_tokens, rpc, device, record):
    """(d)/(e): the CUDA-graph loop; only the whole call and a 1-token call (its prefill) are timed."""
    from rpc_py.hf.generate import graph_generate

    kw = dict(rpc=rpc if config == "rpc_graph" else None, do_sample=False, pad_token_id=0, eos_token_id=None)
    memory = MemoryProbe(device)

    def call(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = graph_generate(model, ids, mask, max_new_tokens=n, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    memory.start()
    out, total = call(new_tokens)
    memory.sample()
    if not record:
        return out, None
    cache = last_cache()  # of the timed call: read before the 1-token call replaces it
    stats = None
    if cache is not None:
        try:
            stats = cache.stats()
        except Exception:  # noqa: BLE001 - statistics are optional for this config
            stats = None
    _, prefill = call(1)
    generated = out.shape[1] - ids.shape[1]
    decode_s = max(total - prefill, 1e-9)
    meas = {
        "generated_tokens": int(generated),
        "prefill_s": prefill,
        "decode_s": decode_s,
        "total_s": total,
        "decode_tokens_per_s": ids.shape[0] * (generated - 1) / decode_s if generated > 1 else float("nan"),
        "end_to_end_tokens_per_s": ids.shape[0] * generated / total,
        "step_ms": [],
        "cache_length": [],
        "memory": memory.result(),
        "kv": {"peak_bytes": 0, "final_live_bytes": 0, "note": "not recorded for the graph loop"},
        "compressions": None,
        "compress_s": 0.0,
        "timing": "whole call minus a 1-token call (no per-step callback in the graph loop)",
    }
    if stats is not None:
        meas["kv"] = {"peak_bytes": int(stats.peak_kv_bytes), "final_live_bytes": int(stats.live_kv_bytes),
                      "note": "rpc_py C cache of the timed call"}
        meas["compressions"] = int(stats.compressions[0]) if stats.compressions else 0
        meas["compress_s"] = float(stats.compress_seconds)
    return out, meas


def generate_once(model, config, ids, mask, new_tokens, rpc, device, record=True):
    """One generate call of ``config``; returns (output ids, measurement dict)."""
    if config.endswith("_graph"):
        return _graph_once(model, config, ids, mask, new_tokens, rpc, device, record)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    memory = MemoryProbe(device)
    dyn = None
    if config == "hf_dynamic":
        dyn = DynamicCache()
        kwargs[_cache_kwarg(model)] = dyn
        length = dyn.get_seq_length
    else:
        def length():
            cache = last_cache()
            return cache.get_physical_length(0) if cache is not None and not cache.closed else -1
    recorder = StepRecorder(device, length, memory)
    kwargs["stopping_criteria"] = StoppingCriteriaList([recorder])
    memory.start()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        if config == "hf_dynamic":
            out = model.generate(ids, attention_mask=mask, **kwargs)
        else:
            out = rpc_generate(model, ids, attention_mask=mask, rpc=rpc if config == "rpc" else None, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    if not record:
        return out, None
    times = recorder.times
    generated = out.shape[1] - ids.shape[1]
    decode_steps = len(times) - 1
    decode_s = times[-1] - times[0] if decode_steps > 0 else float("nan")
    meas = {
        "generated_tokens": int(generated),
        "prefill_s": times[0] - t0,
        "decode_s": decode_s,
        "total_s": t_end - t0,
        "decode_tokens_per_s": ids.shape[0] * decode_steps / decode_s if decode_steps > 0 else float("nan"),
        "end_to_end_tokens_per_s": ids.shape[0] * generated / (t_end - t0),
        "step_ms": [1e3 * (b - a) for a, b in zip(times, times[1:])],
        "cache_length": recorder.lengths,
        "memory": memory.result(),
    }
    if dyn is not None:
        kv = _dynamic_kv_bytes(dyn)
        meas["kv"] = {"peak_bytes": kv, "final_live_bytes": kv, "note": "DynamicCache K/V tensors at the end"}
        meas["compressions"] = 0
        meas["compress_s"] = 0.0
        del dyn
    else:
        st = last_cache().stats()
        meas["kv"] = {"peak_bytes": int(st.peak_kv_bytes), "final_live_bytes": int(st.live_kv_bytes),
                      "note": "rpc_py C cache: allocated peak (K, V, query rings) and live K/V at the end"}
        meas["compressions"] = int(st.compressions[0]) if st.compressions else 0
        meas["compress_s"] = float(st.compress_seconds)
    return out, meas


def _spread(values):
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def _weight_bytes(model) -> int:
    """Bytes a decode step reads of the model's parameters (each tensor once: tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def roofline(model, args, runs, copy_gbps):
    """The memory-bandwidth bound of each configuration's decode rate: every decode step reads the
    weights once and the K/V the cache holds at that step (a lower bound on its traffic; activations,
    logits and writes are left out), so at the device's own copy rate (measured in this run, read +
    write) batch * copy_rate / bytes_per_step tokens/s is the most it could reach. Returns
    {config: {...}} with the bound and the fraction of it the measured median reached."""
    layers, _, kv_heads, head_dim = _model_dims(model)
    es = next(model.parameters()).element_size()
    kv_per_token = 2 * layers * kv_heads * head_dim * es * args.batch  # K and V of every layer, whole batch
    weights = _weight_bytes(model)
    out = {}
    for config in {r["config"] for r in runs}:
        lengths = [L for r in runs if r["config"] == config for L in r["cache_length"][1:] if L and L > 0]
        if not lengths:  # the graph loops record no per-step length: use the schedule's
            steps = args.output - 1
            rpc = args.rpc if config.startswith("rpc") and not config.startswith("rpc_off") else None
            lengths = [(rpc.physical_length(args.prompt, g - 1) if rpc else args.prompt + g - 1) + 1
                       for g in range(1, steps + 1)]
        mean_len = statistics.fmean(lengths)
        step_bytes = weights + kv_per_token * mean_len
        bound = args.batch * copy_gbps * 1e9 / step_bytes
        measured = statistics.median(r["decode_tokens_per_s"] for r in runs if r["config"] == config)
        out[config] = {"weight_bytes": weights, "mean_kv_length": mean_len, "bytes_per_step": step_bytes,
                       "roofline_tok_s": bound, "fraction_of_roofline": measured / bound}
    return out


def run_end_to_end(model, args, clock, checkpoint=lambda partial: None):
    """``checkpoint(partial)`` is called after every measured run with what is known so far, so that a
    run killed by a time limit still leaves its measurements in the JSON."""
    from rpc_py._report import copy_bandwidth_gbps

    copy_gbps = copy_bandwidth_gbps(args.device, nbytes=(1 << 30) if args.device == "cuda" else (1 << 28))
    ids, mask = make_prompts(model, args)
    configs = list(args.configs)
    runs, skipped, outputs = [], [], {}
    for config in configs:  # untimed warm-up: kernels, allocator, the attention registration
        generate_once(model, config, ids, mask, max(2, min(args.warmup, args.output)), args.rpc, args.device,
                      record=False)
    plan = [(r, c) for r in range(args.repeats) for c in configs]
    bar = _progress(len(plan), "generate", args)
    for repeat, config in plan:
        if args.max_seconds is not None and clock() > args.max_seconds:
            skipped.append({"config": config, "repeat": repeat, "reason": f"--max-seconds {args.max_seconds} reached"})
            _tick(bar)
            continue
        out, meas = generate_once(model, config, ids, mask, args.output, args.rpc, args.device)
        meas.update(config=config, repeat=repeat)
        runs.append(meas)
        outputs.setdefault(config, out[:, ids.shape[1]:].cpu())
        checkpoint({"skipped": skipped, "details": {"runs": runs}})
        _tick(bar, f"{config} {meas['decode_tokens_per_s']:.0f} tok/s")
    if bar is not None:
        bar.close()

    results = []
    for config in configs:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        tps = _spread([r["decode_tokens_per_s"] for r in mine])
        mem_peak = max((r["memory"]["peak_bytes"] or 0) for r in mine)
        mem_delta = max((r["memory"]["peak_delta_bytes"] or 0) for r in mine)
        results.append({
            "config": config,
            "generated_tokens": mine[0]["generated_tokens"],
            "decode_tok_s": tps[0],
            "decode_tok_s_min": tps[1],
            "decode_tok_s_max": tps[2],
            "prefill_ms": 1e3 * _spread([r["prefill_s"] for r in mine])[0],
            "peak_mem_mib": mem_peak / MIB,
            "peak_mem_delta_mib": mem_delta / MIB,
            "kv_peak_mib": max(r["kv"]["peak_bytes"] for r in mine) / MIB,
            "kv_final_mib": mine[0]["kv"]["final_live_bytes"] / MIB,
            "max_cache_len": max((max(r["cache_length"]) for r in mine if r["cache_length"]), default=None),
            "compressions": mine[0]["compressions"],
            "compress_ms": 1e3 * _spread([r["compress_s"] for r in mine])[0],
            "step_ms_median": statistics.median(s for r in mine for s in r["step_ms"]) if mine[0]["step_ms"] else None,
            "torch_max_reserved_mib": (max(r["memory"].get("torch_max_reserved_bytes", 0) for r in mine) / MIB
                                       if args.device == "cuda" else None),
            "memory_source": mine[0]["memory"]["source"],
            "repeats": len(mine),
            "generated_tokens_per_run": [r["generated_tokens"] for r in mine],
            "label": LABELS[config],
        })

    bounds = roofline(model, args, runs, copy_gbps) if runs else {}
    for row in results:
        row.update(bounds.get(row["config"], {}))
    counts = sorted({r["generated_tokens"] for r in runs})
    checks = {"generated_tokens": counts, "same_generated_tokens": len(counts) <= 1,
              "expected_generated_tokens": args.output}
    if "hf_dynamic" in outputs:
        ref = outputs["hf_dynamic"]
        for config in ("rpc_off", "rpc", "rpc_off_graph"):
            if config in outputs and outputs[config].shape == ref.shape:
                same = (outputs[config] == ref).all(dim=0)
                diverged = (~same).nonzero()
                checks[f"{config}_tokens_equal_to_hf_dynamic"] = float(same.float().mean())
                checks[f"{config}_first_divergent_token"] = int(diverged[0]) if len(diverged) else None
    if "rpc" in outputs and "rpc_graph" in outputs and outputs["rpc"].shape == outputs["rpc_graph"].shape:
        same = (outputs["rpc_graph"] == outputs["rpc"]).all(dim=0)
        diverged = (~same).nonzero()
        checks["rpc_graph_tokens_equal_to_rpc"] = float(same.float().mean())
        checks["rpc_graph_first_divergent_token"] = int(diverged[0]) if len(diverged) else None
    if "rpc" in args.configs:
        checks["rpc_first_compression_after_token"] = args.rpc.interval + args.rpc.window + 1
    # Only the summary rows are a top-level list (gpu_check.sh prints top-level lists as tables).
    return {"results": results, "skipped": skipped, "checks": checks, "details": {"runs": runs},
            "copy_GBps": copy_gbps,
            "roofline_note": ("bound = batch * copy rate / (weight bytes + mean K/V bytes held per step); the copy "
                              "rate is the device's own (read + write) measured in this run")}


# ------------------------------------------------------------------------------------------ sweep
def _model_dims(model):
    text = model.config.get_text_config(decoder=True)
    q_heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or q_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
    return text.num_hidden_layers, q_heads, kv_heads, head_dim


def _time_decode_steps(model, cache, batch, steps, device, vocab, memory):
    """Median wall time (ms) of one forward decode step (q=1) plus argmax, on an already filled cache."""
    key = _cache_kwarg(model)
    tok = torch.randint(1, vocab, (batch, 1), device=device)
    times = []
    with torch.no_grad():
        for i in range(steps + 2):  # two warm-up steps
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=tok, use_cache=True, **{key: cache})
            tok = out.logits[:, -1:].argmax(-1)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(1e3 * (time.perf_counter() - t0))
            memory.sample()
            del out
    return statistics.median(times), min(times), max(times)


def _fill(cache, layers, k, v):
    for i in range(layers):
        cache.update(k, v, i)


def _time_compression(args, dims, length, keep, dtype, device, repeats):
    """Median ms of one RPC compression of one layer whose cache holds ``length`` tokens (random K/V,
    random selector queries), through the C KVCache that RPCCache drives."""
    _, q_heads, kv_heads, head_dim = dims
    rpc = args.rpc
    g = torch.Generator(device=device).manual_seed(args.seed + length)
    shape = (args.batch, kv_heads, length, head_dim)
    k = torch.randn(shape, generator=g, device=device, dtype=dtype)
    v = torch.randn(shape, generator=g, device=device, dtype=dtype)
    q = torch.randn((args.batch, q_heads, rpc.window, head_dim), generator=g, device=device, dtype=dtype)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else None
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    times = []
    with rpc_py.KVCache(1, args.batch, kv_heads, head_dim, names[dtype], capacity=length,
                        window=rpc.window, q_heads=q_heads) as kv:
        for i in range(repeats + 1):
            kv.reset()
            kv.append(0, k, v, stream=stream)
            kv.record_query(0, q, stream=stream)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rows = 1 if rpc.aggregation == "all" else kv_heads
            kept = torch.empty(args.batch, rows, keep, dtype=torch.int64, device=device)  # as RPCCache does
            kv.compress(0, args.prompt, keep, aggregation=rpc.aggregation, pooling=rpc.pooling,
                        kernel_size=rpc.kernel_size, stream=stream, indices_out=kept)
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _interp(xs, ys, x):
    """Piecewise-linear interpolation, None outside [xs[0], xs[-1]] (no extrapolation)."""
    if x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


# How a step time outside the measured lengths is filled in. Both rules err towards a slower step, and
# both apply alike to every configuration integrated over the same curve.
EXTRAPOLATION_RULES = {
    "below": "flat at the step time of the smallest measured length (a shorter cache costs no more, so this "
             "overstates those steps)",
    "above": "straight line through the two largest measured lengths (flat when only one is measured), never "
             "below the largest one's step time (decode attention grows linearly with L)",
}


def _extrapolate(xs, ys, x):
    """Step time at ``x`` outside [xs[0], xs[-1]] by ``EXTRAPOLATION_RULES``."""
    if x < xs[0]:
        return ys[0]
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 and xs[-1] > xs[-2] else 0.0
    return ys[-1] + max(slope, 0.0) * (x - xs[-1])


def integrate(curve, lengths_at_steps, extra_ms=0.0, extrapolate=True):
    """Sum the step time over the attention length of every decode step: interpolated between measured
    lengths, extrapolated outside them (``EXTRAPOLATION_RULES``).

    Returns ``(total_ms, extrapolated)``: ``extrapolated`` lists, per side ("below", "above") that was
    needed, the range of lengths, the number of steps and the rule. With ``extrapolate=False`` a step
    outside the measured range gives ``(None, that_length)`` instead."""
    xs = [p[0] for p in curve]
    ys = [p[1] for p in curve]
    total = extra_ms
    outside = {}
    for L in lengths_at_steps:
        t = _interp(xs, ys, L)
        if t is None:
            if not extrapolate:
                return None, L
            side = "below" if L < xs[0] else "above"
            lo, hi, n = outside.get(side, (L, L, 0))
            outside[side] = (min(lo, L), max(hi, L), n + 1)
            t = _extrapolate(xs, ys, L)
        total += t
    extrapolated = [{"side": side, "lengths": [lo, hi], "steps": n, "rule": EXTRAPOLATION_RULES[side]}
                    for side, (lo, hi, n) in sorted(outside.items())]
    return total, extrapolated


def sweep_lengths(args):
    """The cache lengths to measure: ``--sweep-lengths``, plus the first decode step's length
    (prompt + 1, the shortest cache any schedule attends to) when it is below them, unless
    ``--sweep-exact-lengths``; a point at the short end is the cheapest of the sweep. Returns
    ``(lengths, added)`` with ``added`` a list of ``{"length", "reason"}``."""
    lengths = sorted(set(args.sweep_lengths))
    added = []
    first = args.prompt + 1
    if not args.sweep_exact_lengths and first < lengths[0]:
        added.append({"length": first,
                      "reason": "prompt + 1, the cache length of the first decode step, is below the smallest "
                                "--sweep-lengths; measured so that the integration covers the short end "
                                "(--sweep-exact-lengths: extrapolate instead)"})
        lengths = [first] + lengths
    return lengths, added


def run_sweep(model, args, clock, checkpoint=lambda partial: None):
    """``checkpoint(partial)``: called after every measured point (see ``run_end_to_end``)."""
    device = args.device
    dims = _model_dims(model)
    layers, q_heads, kv_heads, head_dim = dims
    dtype = next(model.parameters()).dtype
    vocab = model.config.get_text_config(decoder=True).vocab_size
    lengths, added = sweep_lengths(args)
    added_lengths = {a["length"] for a in added}
    bytes_per_token = 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    points, skipped = [], []
    kinds = [c for c in ("hf_dynamic", "rpc_off") if c in args.configs or c == "rpc_off"]
    plan = [(kind, L) for kind in kinds for L in lengths]
    bar = _progress(len(plan), "sweep", args)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with compress(model, None):  # rpc attention wrappers in place, as during rpc_py.generate
        for kind, L in plan:
            if args.max_seconds is not None and clock() > args.max_seconds:
                skipped.append({"cache": kind, "length": L, "reason": f"--max-seconds {args.max_seconds} reached"})
                _tick(bar)
                continue
            memory = MemoryProbe(device)
            memory.start()
            k = torch.randn((args.batch, kv_heads, L, head_dim), generator=g, device=device, dtype=dtype)
            v = torch.randn_like(k)
            if kind == "hf_dynamic":
                cache = DynamicCache()
            else:
                cache = RPCCache(model, None, capacity=L + args.sweep_steps + 4)
            _fill(cache, layers, k, v)
            del k, v
            try:
                med, lo, hi = _time_decode_steps(model, cache, args.batch, args.sweep_steps, device, vocab, memory)
            finally:
                if kind == "rpc_off":
                    cache.release()
                del cache
            mem = memory.result()
            points.append({"cache": kind, "length": L, "origin": "added" if L in added_lengths else "requested",
                           "step_ms": med, "step_ms_min": lo, "step_ms_max": hi,
                           "decode_tok_s_at_length": args.batch * 1e3 / med,
                           "kv_mib_at_length": bytes_per_token * args.batch * L / MIB,
                           "peak_mem_mib": (mem["peak_bytes"] or 0) / MIB})
            checkpoint({"skipped": skipped, "measured": {"step_time": points, "compression": []}})
            _tick(bar, f"{kind} L={L} {med:.2f} ms")
    if bar is not None:
        bar.close()

    # One compression per layer at every length the schedule compresses at (up to the longest output).
    rpc = args.rpc
    max_out = max(args.sweep_outputs)
    compress_ms = []
    for n in range(rpc.compressions_after(max_out - 1)):
        before = args.prompt + rpc.kept_after(n) + rpc.interval + rpc.window
        if args.max_seconds is not None and clock() > args.max_seconds:
            skipped.append({"compression": n, "length": before, "reason": f"--max-seconds {args.max_seconds} reached"})
            break
        ms = _time_compression(args, dims, before, rpc.kept_after(n + 1), dtype, device, repeats=3)
        compress_ms.append({"compression": n, "length_before": before, "keep": rpc.kept_after(n + 1),
                            "ms_per_layer": ms, "ms_all_layers": ms * layers})
        checkpoint({"skipped": skipped, "measured": {"step_time": points, "compression": compress_ms}})

    integrated = []
    for out_len in args.sweep_outputs:
        steps = out_len - 1  # the first token comes from the prefill
        full_lengths = [args.prompt + g for g in range(1, steps + 1)]
        # At decode step g the attention runs on the cache before that step's compression.
        rpc_lengths = [rpc.physical_length(args.prompt, g - 1) + 1 for g in range(1, steps + 1)]
        n_comp = rpc.compressions_after(steps)
        schedules = {"hf_dynamic": (full_lengths, 0), "rpc_off": (full_lengths, 0), "rpc": (rpc_lengths, n_comp)}
        for config, (sched, nc) in schedules.items():
            curve_kind = "hf_dynamic" if config == "hf_dynamic" else "rpc_off"
            curve = [(p["length"], p["step_ms"]) for p in points if p["cache"] == curve_kind]
            row = {"config": config, "output_tokens": out_len, "kind": INTEGRATED}
            if not curve:
                row.update(decode_tok_s=None, reason="no length measured for this cache (time budget)")
                integrated.append(row)
                continue
            if nc > len(compress_ms):
                row.update(decode_tok_s=None, reason="compression times not measured (time budget)")
                integrated.append(row)
                continue
            extra = sum(c["ms_all_layers"] for c in compress_ms[:nc])
            total_ms, extrapolated = integrate(curve, sched, extra)
            peak_len = max(sched)
            n_out = sum(e["steps"] for e in extrapolated)
            row.update(decode_tok_s=args.batch * steps * 1e3 / total_ms, decode_s=total_ms / 1e3,
                       compressions_per_layer=nc, compress_s=extra / 1e3, steps=steps,
                       measured_lengths=[curve[0][0], curve[-1][0]], extrapolated=extrapolated,
                       extrapolated_steps=n_out, extrapolated_fraction=n_out / steps,
                       step_times=("interpolated between measured lengths" if not extrapolated else
                                   f"interpolated between measured lengths; {n_out} of {steps} steps extrapolated ("
                                   + ", ".join(f"{e['side']}: L={e['lengths'][0]}..{e['lengths'][1]}"
                                               for e in extrapolated) + ")"))
            row.update(peak_cache_len=peak_len, kv_peak_mib=bytes_per_token * args.batch * peak_len / MIB,
                       label=LABELS[config])
            integrated.append(row)
    # The integrated rows are the headline (top-level list); the measurements they come from are nested.
    return {"results": integrated, "skipped": skipped,
            "measured": {"step_time": points, "compression": compress_ms},
            "sweep_lengths_measured": lengths, "sweep_lengths_added": added,
            "extrapolation_rules": EXTRAPOLATION_RULES,
            "bytes_per_token_per_sequence": bytes_per_token}


# ---------------------------------------------------------------------------------------- output
def _progress(total, desc, args):
    if tqdm is None or args.no_progress:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def _tick(bar, text=None):
    if bar is not None:
        if text:
            bar.set_postfix_str(text)
        bar.update(1)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def format_table(rows, columns):
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells)


def plot_end_to_end(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for config in CONFIGS:
        mine = [r for r in data["details"]["runs"] if r["config"] == config]
        if not mine:
            continue
        run = sorted(mine, key=lambda r: r["decode_s"])[len(mine) // 2]  # the median run
        steps = range(1, len(run["step_ms"]) + 1)
        ax1.plot(steps, run["step_ms"], lw=0.8, label=LABELS[config])
        ax2.plot(range(len(run["cache_length"])), run["cache_length"], lw=1.2, label=LABELS[config])
    ax1.set_ylabel("decode step time (ms)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    s = data["settings"]
    import textwrap

    title = (f"{s['model']} on {s['device']}: batch {s['batch']}, prompt {s['prompt']}, output {s['output']}, "
             f"{s['rpc']}")
    ax1.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    ax2.set_ylabel("cache length (tokens, layer 0)")
    ax2.set_xlabel("generated token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("hf_dynamic", "rpc_off"):
        pts = [p for p in data["measured"]["step_time"] if p["cache"] == kind]
        if pts:
            ax.errorbar([p["length"] for p in pts], [p["step_ms"] for p in pts],
                        yerr=[[p["step_ms"] - p["step_ms_min"] for p in pts],
                              [p["step_ms_max"] - p["step_ms"] for p in pts]],
                        marker="o", capsize=3, label=LABELS[kind])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache length L (tokens)")
    ax.set_ylabel("decode step time (ms, median)")
    s = data["settings"]
    ax.set_title(f"{s['model']} on {s['device']}, batch {s['batch']}: step time vs cache length", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()

    def clock():
        return time.perf_counter() - t_start

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(args)
    if args.device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    layers, q_heads, kv_heads, head_dim = _model_dims(model)
    settings = {
        "model": args.name, "device": args.device, "dtype": args.dtype, "batch": args.batch, "prompt": args.prompt,
        "output": args.output, "rpc": repr(args.rpc), "interval": args.rpc.interval, "window": args.rpc.window,
        "ratio": args.rpc.ratio, "budget": args.rpc.budget, "aggregation": args.rpc.aggregation,
        "repeats": args.repeats, "warmup_tokens": args.warmup, "max_seconds": args.max_seconds, "seed": args.seed,
        "layers": layers, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "parameters": sum(p.numel() for p in model.parameters()), "weights": "local" if args.model else "random",
        "attention": "sdpa", "decoding": "greedy, EOS disabled (min_new_tokens = max_new_tokens)",
        "model_build_s": build_s,
    }
    data = {"benchmark": "bench_generate", "mode": "sweep" if args.sweep else "end_to_end",
            "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
            "machine": machine_info(args.device), "versions": versions(), "settings": settings}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def write(snapshot):
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(snapshot, f, indent=1)
        os.replace(tmp, args.json)  # a reader never sees half a file

    def checkpoint(partial):
        write(dict(data, **partial, partial=True, elapsed_s=clock()))

    checkpoint({})
    if args.sweep:
        settings.update(sweep_lengths=args.sweep_lengths, sweep_steps=args.sweep_steps,
                        sweep_outputs=args.sweep_outputs,
                        sweep_note=("step time = one model forward (q=1) + argmax outside generate(), on a cache "
                                    "filled with random K/V; totals are " + INTEGRATED))
        data.update(run_sweep(model, args, clock, checkpoint))
    else:
        data.update(run_end_to_end(model, args, clock, checkpoint))
    data["elapsed_s"] = clock()
    data["partial"] = False
    write(data)
    png = None
    if not args.no_plot:
        try:
            png = os.path.splitext(args.json)[0] + ".png"
            (plot_sweep if args.sweep else plot_end_to_end)(data, png)
        except ImportError:
            png = None
            print("matplotlib not installed: no plot", file=sys.stderr)

    # Summary last.
    m = data["machine"]
    print(f"\n{args.name} ({settings['parameters'] / 1e6:.1f}M params, {args.dtype}, {settings['weights']} weights) "
          f"on {m.get('gpu', m['cpu'])}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"batch {args.batch}, prompt {args.prompt}, RPC {args.rpc!r}")
    if args.sweep:
        print("\nstep time vs cache length (measured; origin 'added': prompt + 1, below --sweep-lengths)")
        print(format_table(data["measured"]["step_time"], ["cache", "length", "origin", "step_ms", "step_ms_min",
                                                           "step_ms_max", "decode_tok_s_at_length",
                                                           "kv_mib_at_length", "peak_mem_mib"]))
        if data["measured"]["compression"]:
            print("\none RPC compression (measured, random K/V)")
            print(format_table(data["measured"]["compression"], ["compression", "length_before", "keep", "ms_per_layer",
                                                     "ms_all_layers"]))
        print(f"\ndecode throughput over a whole generation ({INTEGRATED}; extrapolated_fraction: share of the "
              "decode steps whose cache length is outside the measured lengths)")
        print(format_table(data["results"], ["config", "output_tokens", "decode_tok_s", "decode_s",
                                             "compressions_per_layer", "peak_cache_len", "kv_peak_mib",
                                             "extrapolated_fraction", "reason"]))
        for side, rule in data["extrapolation_rules"].items():
            rows = [r for r in data["results"] if any(e["side"] == side for e in r.get("extrapolated", []))]
            if rows:
                print(f"extrapolated {side} the measured lengths ({len(rows)} row(s)): {rule}")
    else:
        print(f"output {args.output} tokens, {args.repeats} repeat(s); decode tok/s = median [min, max]")
        print(format_table(data["results"], ["config", "generated_tokens", "decode_tok_s", "decode_tok_s_min",
                                             "decode_tok_s_max", "prefill_ms", "peak_mem_mib", "peak_mem_delta_mib",
                                             "kv_peak_mib", "kv_final_mib", "max_cache_len", "compressions",
                                             "compress_ms"]))
        print(f"memory-bandwidth roofline (copy rate {data['copy_GBps']:.1f} GB/s measured in this run; "
              "bytes per step = weights + mean K/V held)")
        print(format_table(data["results"], ["config", "decode_tok_s", "roofline_tok_s", "fraction_of_roofline",
                                             "mean_kv_length", "bytes_per_step"]))
        print("checks:", json.dumps(data["checks"]))
    for s in data["skipped"]:
        print("SKIPPED:", json.dumps(s))
    print(f"JSON: {args.json}" + (f"\nplot: {png}" if png else ""))
    if not args.sweep and not data["checks"]["same_generated_tokens"]:
        print("ERROR: the configurations generated different numbers of tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
