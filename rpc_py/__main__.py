"""``python -m rpc_py``: the main job on an embedded default, with no download.

Builds a small Qwen2-shaped model from a config with a fixed seed (random weights: no checkpoint is
needed), generates the same continuation with the full KV cache and with RPC, and prints what
compression did: cache lengths, compressions, bytes, and how many tokens the two runs share.
Options let the same script run any local checkpoint (``--model PATH``) and other RPC settings.
"""

from __future__ import annotations

import argparse
import time


def _build_default_model(seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpc_py", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="path of a local transformers checkpoint (default: embedded tiny model)")
    p.add_argument("--new-tokens", type=int, default=384)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--interval", type=int, default=64, help="P")
    p.add_argument("--window", type=int, default=16, help="R")
    p.add_argument("--ratio", type=int, default=4, help="c")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    import rpc_py
    from rpc_py import RPCConfig, generate, last_cache

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    else:
        model = _build_default_model(args.seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, vocab, (args.batch, args.prompt_length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               eos_token_id=None, pad_token_id=0)
    cfg = RPCConfig(interval=args.interval, window=args.window, ratio=args.ratio, budget=args.budget)

    print(f"rpc_py {rpc_py.__version__}, backends {sorted(rpc_py.backend_features)}")
    print(f"model: {'embedded tiny Qwen2 (random weights)' if not args.model else args.model}, "
          f"batch {args.batch}, prompt {args.prompt_length}, {args.new_tokens} new tokens")
    runs = {}
    for name, rpc in (("full KV", None), (f"RPC {cfg}", cfg)):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = generate(model, input_ids=input_ids, attention_mask=attention_mask, rpc=rpc, **gen)
        dt = time.perf_counter() - t0
        cache = last_cache()
        runs[name] = out[:, args.prompt_length:]
        print(f"\n== {name}: {dt:.2f} s")
        print(cache.summary())
    full, comp = runs.values()
    same = (full == comp).float().mean().item()
    first_diff = (full != comp).any(0).nonzero()
    first = int(first_diff[0]) if len(first_diff) else None
    print(f"\ntokens identical to full KV: {same:.1%}"
          + (f" (first difference at new token {first})" if first is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
