"""Shared helpers of the transformers-integration tests: tiny config-built models, fixed seeds."""

from __future__ import annotations

import pytest
import torch
import transformers

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
VOCAB = 128


def make_model(arch: str = "qwen2", attn: str = "sdpa", seed: int = 0, layers: int = 2):
    """A tiny float32 decoder (hidden 64, 4 query heads, 2 KV heads) with fixed random weights.

    ``initializer_range`` is larger than the library default so that next-token distributions are
    peaked: greedy decoding then has no near-ties that float rounding could flip.
    """
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed + 17 * ARCHS.index(arch))  # distinct weights per architecture
    model = cls(config).eval()
    model.set_attn_implementation(attn)
    # No end-of-sequence token: every run generates exactly max_new_tokens tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch: int, lengths=None, seed: int = 1):
    """Left-padded prompt batch: (input_ids, attention_mask, list of unpadded prompts)."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = [7] * batch
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    singles = []
    for b, n in enumerate(lengths):
        seq = torch.randint(1, VOCAB, (n,), generator=g)
        ids[b, width - n :] = seq
        mask[b, width - n :] = 1
        singles.append(seq.unsqueeze(0))
    return ids, mask, singles


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread is fastest and immune to a busy machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy(**kw):
    """generate() options for greedy decoding plus ``kw``."""
    return dict(do_sample=False, **kw)
