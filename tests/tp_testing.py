"""Launcher and scenarios of the tensor-parallel tests (tests/test_tensor_parallel.py).

``launch`` starts ``world`` processes (torch.multiprocessing, spawn) that form a gloo group with a short
timeout (file rendezvous, no port to pick), load each saved tiny model with transformers' tensor
parallelism (``tp_plan="auto"``) and run every scenario of ``SCENARIOS`` through rpc_py, then the error scenarios
(ranks given different RPC settings; one rank failing mid-generation). Each result goes back through a
queue as plain Python data. ``run_scenario`` is the same code in one process on the unsharded model,
so the test compares like with like. Everything is float32 on CPU, greedy, no EOS.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import time
import traceback
import warnings

import torch
import transformers

VOCAB = 128
SCHEDULE = dict(interval=8, window=4, ratio=2)
NEW_TOKENS = 40
PROMPT_LENGTHS = (7, 5)  # batch 2, the second sequence left-padded
FAIL_AT_STEP = 22  # the failing rank raises here (after each layer's first compressions, at 12 and 20)


def tiny_config(arch: str):
    """8 query heads and 4 KV heads (GQA 2; 2 KV heads per rank over 2 processes), head_dim 16, 2 layers."""
    common = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.2,
                  tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if arch == "qwen2":
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    raise ValueError(arch)


def save_tiny_model(arch: str, path: str, seed: int = 0) -> None:
    config, cls = tiny_config(arch)
    torch.manual_seed(seed + (0 if arch == "llama" else 1))
    model = cls(config).eval()
    model.save_pretrained(path)


def _tp_kwargs() -> dict:
    """``from_pretrained`` arguments for transformers' tensor parallelism: ``DistributedConfig(tp_plan=...)``
    where it takes one (5.1x onwards), else the older ``tp_plan=`` keyword."""
    import inspect

    config_cls = getattr(transformers, "DistributedConfig", None)
    if config_cls is not None and "tp_plan" in inspect.signature(config_cls).parameters:
        return dict(distributed_config=config_cls(tp_plan="auto"))
    return dict(tp_plan="auto")


def load(path: str, tp: bool):
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                                  **(_tp_kwargs() if tp else {}))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts():
    g = torch.Generator().manual_seed(1)
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(PROMPT_LENGTHS):
        ids[b, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


def _rpc(spec):
    from rpc_py import RPCConfig
    from rpc_py.policies import RKV, SnapKV, Random

    objects = {"snapkv_all_max": SnapKV(pooling="max", kernel_size=3, aggregation="all"),
               "random_group": Random(seed=3, aggregation="group"), "rkv_all": RKV(aggregation="all")}
    if spec is None:
        return None
    policy = spec.pop("policy", "rpc")
    return RPCConfig(**SCHEDULE, **spec, policy=objects.get(policy, policy))


# name -> (architectures, RPCConfig fields; None = rpc=None)
SCENARIOS = {
    "none": (("llama", "qwen2"), None),
    "rpc_all": (("llama", "qwen2"), dict()),
    "rpc_all_max": (("llama",), dict(pooling="max", kernel_size=5)),
    "rpc_group": (("llama", "qwen2"), dict(aggregation="group")),
    "snapkv": (("llama", "qwen2"), dict(policy="snapkv")),
    "snapkv_all_max": (("llama",), dict(policy="snapkv_all_max")),
    "h2o": (("llama", "qwen2"), dict(policy="h2o")),
    "tova": (("llama",), dict(policy="tova")),
    "random_group": (("llama",), dict(policy="random_group")),
    "rkv_all": (("llama",), dict(policy="rkv_all")),
    "recent": (("llama",), dict(policy="recent")),
}


def run_scenario(model, name: str) -> dict:
    """One generation through rpc_py.generate with an RPCCache we keep (for its layout), recording every
    compression's kept indices."""
    import rpc_py

    spec = SCENARIOS[name][1]
    rpc = _rpc(None if spec is None else dict(spec))
    ids, mask = prompts()
    cache = rpc_py.RPCCache(model, rpc, padding=(mask.cumsum(-1) == 0).sum(-1))
    events = []
    cache.compression_hook = events.append
    out = rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, past_key_values=cache,
                          max_new_tokens=NEW_TOKENS, do_sample=False)
    st = cache.stats()
    result = dict(
        tokens=out[:, ids.shape[1]:].tolist(),
        events=[(e.layer, e.generated, e.keep, e.indices.tolist()) for e in events],
        positions=[cache.logical_positions(i).tolist() for i in range(cache.num_layers)],
        kv_bytes=st.kv_bytes, peak_kv_bytes=st.peak_kv_bytes, live_kv_bytes=st.live_kv_bytes,
        total_kv_bytes=st.total_kv_bytes, total_live_kv_bytes=st.total_live_kv_bytes,
        tp_size=st.tp_size, tp_rank=st.tp_rank, summary=st.summary(), q_heads=cache.num_q_heads,
    )
    cache.release()
    return result


def run_compress_block(model) -> dict:
    """``rpc_py.compress`` around ``model.generate``, and the statistics after the call."""
    import rpc_py

    ids, mask = prompts()
    rpc = _rpc(dict())
    with rpc_py.compress(model, rpc) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    st = handle.last_cache.stats()
    return dict(tokens=out[:, ids.shape[1]:].tolist(), kv_bytes=st.kv_bytes, peak_kv_bytes=st.peak_kv_bytes,
                total_peak_kv_bytes=st.total_peak_kv_bytes, compressions=st.compressions, summary=st.summary())


def run_graph_fallback(model) -> dict:
    import rpc_py
    from rpc_py.hf.graph import static_decode

    ids, mask = prompts()
    rpc = _rpc(dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, cuda_graph=True, max_new_tokens=NEW_TOKENS,
                              do_sample=False)
    static = static_decode(model, ids, mask, rpc=rpc, max_new_tokens=NEW_TOKENS, capture=False)
    return dict(tokens=out[:, ids.shape[1]:].tolist(), static_tokens=static[:, ids.shape[1]:].tolist(),
                warnings=[f"{type(w.message).__name__}: {w.message}" for w in caught])


def run_explicit_group(config_path: str, model, group) -> dict:
    """A cache built from a bare config with ``tp_group=`` given by hand."""
    import rpc_py

    ids, mask = prompts()
    rpc = _rpc(dict())
    cache = rpc_py.RPCCache(transformers.AutoConfig.from_pretrained(config_path), rpc, tp_group=group,
                            padding=(mask.cumsum(-1) == 0).sum(-1))
    out = rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, past_key_values=cache,
                          max_new_tokens=NEW_TOKENS, do_sample=False)
    result = dict(tokens=out[:, ids.shape[1]:].tolist(),
                  positions=[cache.logical_positions(i).tolist() for i in range(cache.num_layers)])
    cache.release()
    return result


def _error(e: BaseException) -> dict:
    return dict(error=type(e).__name__, message=str(e))


def run_mismatch(model, rank: int) -> dict:
    """Rank 0 and rank 1 call rpc_py with different intervals: a clear error on both, no hang."""
    import rpc_py
    from rpc_py import RPCConfig

    ids, mask = prompts()
    rpc = RPCConfig(interval=8 if rank == 0 else 16, window=4, ratio=2)
    try:
        rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=NEW_TOKENS, do_sample=False)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return _error(e)
    return dict(error=None)


class _FailAt(transformers.LogitsProcessor):
    def __init__(self, step: int):
        self.calls, self.step = 0, step

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            raise RuntimeError(f"deliberate failure of this rank at decode step {self.step}")
        return scores


def run_failure(model, rank: int, failing_rank: int, results, flag: str, group_timeout_s: float) -> None:
    """``failing_rank`` raises in the middle of a compressed generation and then stays alive without
    joining any collective (the case that hangs without timeouts) until the other ranks have reported;
    every rank must end with an error."""
    import rpc_py

    ids, mask = prompts()
    processors = transformers.LogitsProcessorList([_FailAt(FAIL_AT_STEP)] if rank == failing_rank else [])
    start = time.monotonic()
    try:
        rpc_py.generate(model, ids, attention_mask=mask, rpc=_rpc(dict()), max_new_tokens=NEW_TOKENS,
                        do_sample=False, logits_processor=processors)
        result = dict(error=None)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        result = _error(e)
    result["seconds"] = time.monotonic() - start
    results.put((rank, ("any", "failure"), result))
    if rank == failing_rank:
        deadline = time.monotonic() + 3 * group_timeout_s
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.2)
    else:
        with open(f"{flag}.{rank}", "w"):
            pass
        os.replace(f"{flag}.{rank}", flag)


# ------------------------------------------------------------------------------------------ processes


def _worker(rank: int, world: int, store: str, paths: dict, results, group_timeout_s: float):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        for arch, path in paths.items():
            model = load(path, tp=True)
            for name, (archs, _) in SCENARIOS.items():
                if arch in archs:
                    results.put((rank, (arch, name), run_scenario(model, name)))
            if arch == "llama":
                results.put((rank, (arch, "compress_block"), run_compress_block(model)))
                results.put((rank, (arch, "graph_fallback"), run_graph_fallback(model)))
                from rpc_py.hf.parallel import find_tensor_parallel

                group = find_tensor_parallel(model).group
                results.put((rank, (arch, "explicit_group"), run_explicit_group(path, model, group)))
                results.put((rank, (arch, "mismatch"), run_mismatch(model, rank)))
        # Last: it breaks the group.
        run_failure(model, rank, world - 1, results, f"{store}.failed", group_timeout_s)
    except BaseException as e:  # noqa: BLE001 - anything unexpected is reported, then the process exits
        results.put((rank, ("worker", "crash"), dict(error=type(e).__name__, message=traceback.format_exc())))
    finally:
        results.put((rank, ("worker", "done"), None))


def launch(paths: dict, store: str, world: int = 2, group_timeout_s: float = 20.0):
    """Start the workers; returns ``collect(timeout_s)`` which gathers their results into
    ``{(rank, (arch, scenario)): result}`` and stops every worker (killing any still alive)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, store, paths, results, group_timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()

    def collect(timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        out, done = {}, set()
        try:
            while len(done) < world:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    rank, key, value = results.get(timeout=min(left, 5.0))
                except queue_module.Empty:
                    if not any(p.is_alive() for p in procs) and results.empty():
                        break
                    continue
                if key == ("worker", "done"):
                    done.add(rank)
                else:
                    out[(rank, key)] = value
        finally:
            for p in procs:
                p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        out["finished"] = sorted(done)
        return out

    return collect
