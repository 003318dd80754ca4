"""Tiny seeded models saved as folders vLLM can load, and the rpc_py.generate reference runs."""

from __future__ import annotations

import torch

from rpc_py import RPCConfig

HEAD_DIM = 64


def save_tiny(folder: str, arch: str = "llama", seed: int = 0, layers: int = 2, scale: float = 4.0) -> str:
    """A tiny random decoder (head size 64: vLLM's CPU attention needs >= 32), float32, no tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=HEAD_DIM, vocab_size=512, max_position_embeddings=4096,
                  tie_word_embeddings=False, torch_dtype="float32")
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common, use_sliding_window=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights: peaked next-token distributions, no near-ties in greedy decoding
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    model.save_pretrained(folder)
    return folder


def prompts(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def reference(folder: str, prompt: list[int], rpc, max_new_tokens: int):
    """rpc_py.generate on one prompt alone (greedy, float32): its new tokens and, per layer, the logical
    position of every physical slot at the end (None without RPC)."""
    import rpc_py
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.tensor([prompt])
    cache = rpc_py.RPCCache(model, rpc)
    out = rpc_py.generate(model, ids, rpc=rpc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          do_sample=False, past_key_values=cache, pad_token_id=0)
    positions = [cache.logical_positions(i)[0].tolist() for i in range(cache.num_layers)]
    cache.release()
    return out[0, len(prompt):].tolist(), positions


# ------------------------------------------------------------------------------------ engines

NEW = 64
DEFAULT = RPCConfig(interval=16, window=8, ratio=2)


def make_engine(folder, rpc=DEFAULT, **kw):
    """An in-process vLLM engine (float32, eager, block size 32, chunked prefill in chunks of 64) with
    rpc_py's settings ``rpc`` as every request's default, kept positions recorded; ``rpc=False``: plain
    vLLM."""
    from vllm import LLM

    from rpc_py.vllm import engine_config

    args = dict(model=folder, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=2048,
                block_size=32, seed=0, max_num_batched_tokens=64, enable_chunked_prefill=True)
    args.update(kw)
    if rpc is not False:
        args["additional_config"] = engine_config(rpc, record_positions=True)
    return LLM(**args)


def close(llm) -> None:
    """Shut an engine down before the next one starts (one in-process engine at a time)."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()


def params(rpc="default", n=NEW):
    """Greedy, exactly ``n`` tokens; ``rpc``: "default" (the engine's), None (off) or an RPCConfig."""
    from vllm import SamplingParams

    from rpc_py.vllm import request_args

    extra = None if rpc == "default" else request_args(rpc)
    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, extra_args=extra)


def run_staggered(llm, jobs, every=3):
    """Add the requests (id, prompt, params) one by one, ``every`` engine steps apart, then run to
    completion; returns {request id: output token ids}."""
    engine = llm.llm_engine
    pending = list(jobs)
    outputs, step = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            rid, prompt, p = pending.pop(0)
            engine.add_request(rid, {"prompt_token_ids": prompt}, p)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    return outputs


def kept(llm, request_id):
    got = llm.collective_rpc("rpc_py_kept_positions", args=(request_id,))[0]
    assert got is not None, f"no kept positions recorded for {request_id}"
    return got


def assert_same_positions(kept_layout, want, what):
    """Per layer, the kept logical positions equal the reference's (RPCCache.logical_positions gives one
    row per KV head; one kept set for all heads is one row here, so it is repeated to compare)."""
    for layer, want_layer in enumerate(want):
        mine = kept_layout["layers"].get(layer, kept_layout["layers"].get(str(layer)))
        assert mine is not None, f"{what} layer {layer}: no kept positions"
        if len(mine) == 1 and len(want_layer) > 1:
            mine = mine * len(want_layer)
        assert mine == want_layer, f"{what} layer {layer}: kept positions differ"


def scheduler(llm):
    """The engine core's scheduler (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0 in conftest)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def internal_id(sched, request_id):
    """vLLM's id inside the engine for the request added as ``request_id`` (it appends a random suffix)."""
    ids = [r for r in sched.requests if r.rsplit("-", 1)[0] == request_id]
    return ids[-1] if ids else None
