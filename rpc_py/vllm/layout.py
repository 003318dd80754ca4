"""Reading and writing one request's tokens in vLLM's paged KV cache (the CPU attention backend).

vLLM's CPU backend packs each (block, KV head) region in an instruction-set-specific order (keys
transposed for the vector kernels, VNNI tiles for AMX, ...). Writing goes through vLLM's own op
(``cpu_attn_reshape_and_cache``), so it is always in the right order. For reading there is no op, so
the order is learnt once per layer shape by writing probes through that same op: keys whose value is
their token index, then their head-dimension index (both exact in every supported dtype, below 256),
and locating them in the block. The resulting index map gathers any block back into token order. A
layout is thereby never guessed, and a vLLM that changes its packing is caught by the round trip
check (``PagedLayout.check``) instead of compacting garbage.
"""

from __future__ import annotations

import torch

__all__ = ["PagedLayout", "split_cache"]


def _write_op():
    from vllm import _custom_ops as ops

    return ops.cpu_attn_reshape_and_cache


def split_cache(kv_cache: torch.Tensor):
    """(key_cache, value_cache) views of one layer's ``[num_blocks, kv_heads, block, 2 * head]`` cache,
    as the CPU backend splits it."""
    num_blocks, kv_heads, block, _ = kv_cache.shape
    view = kv_cache.view(num_blocks, kv_heads, block * 2, -1)
    return view.chunk(2, dim=2)


class PagedLayout:
    """Token order <-> memory order of one layer shape (dtype, block size, KV heads, head size, isa)."""

    def __init__(self, dtype: torch.dtype, block_size: int, kv_heads: int, head_size: int, isa: str):
        if block_size > 256 or head_size > 256:
            raise ValueError(f"rpc_py.vllm: block_size {block_size} / head size {head_size} above 256 is not supported")
        self.dtype, self.block_size, self.kv_heads, self.head_size, self.isa = dtype, block_size, kv_heads, head_size, isa
        self.key_map = self._learn(which=0)    # [block * head] memory offset of token t, dim d (t-major)
        self.value_map = self._learn(which=1)

    def _learn(self, which: int) -> torch.Tensor:
        bs, H, D = self.block_size, self.kv_heads, self.head_size
        cache = torch.zeros(1, H, bs, 2 * D, dtype=self.dtype)
        kc, vc = split_cache(cache)
        slots = torch.arange(bs, dtype=torch.int64)
        coords = []
        for axis in ("token", "dim"):
            t = torch.arange(bs, dtype=torch.float32)[:, None, None].expand(bs, H, D)
            d = torch.arange(D, dtype=torch.float32)[None, None, :].expand(bs, H, D)
            probe = (t if axis == "token" else d).to(self.dtype).contiguous()
            zero = torch.zeros_like(probe)
            key, value = (probe, zero) if which == 0 else (zero, probe)
            cache.zero_()
            _write_op()(key, value, kc, vc, slots, self.isa)
            region = (kc if which == 0 else vc)[0, 0].reshape(-1).to(torch.float32)  # head 0's memory, in order
            coords.append(region.round().to(torch.int64))
        token_at, dim_at = coords
        if not (bool((token_at >= 0).all()) and bool((token_at < bs).all()) and bool((dim_at < D).all())):
            raise RuntimeError("rpc_py.vllm: could not learn the KV cache layout of vLLM's CPU backend")
        inverse = torch.full((bs * D,), -1, dtype=torch.int64)
        inverse[token_at * D + dim_at] = torch.arange(bs * D, dtype=torch.int64)
        if bool((inverse < 0).any()):
            raise RuntimeError(f"rpc_py.vllm: the {self.isa} KV layout is not a permutation of token x dim: unsupported")
        return inverse

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int):
        """Keys and values ``[length, kv_heads, head]`` of the first ``length`` slots of a request whose
        blocks are ``block_ids`` (int tensor, in order)."""
        kc, vc = split_cache(kv_cache)
        bs, H, D = self.block_size, self.kv_heads, self.head_size
        nb = -(-length // bs)
        ids = block_ids[:nb].to(torch.int64)
        out = []
        for cache, index in ((kc, self.key_map), (vc, self.value_map)):
            region = cache[ids].reshape(nb, H, bs * D)  # per block and head: its memory, in order
            tokens = region[:, :, index].reshape(nb, H, bs, D)
            out.append(tokens.permute(0, 2, 1, 3).reshape(nb * bs, H, D)[:length])
        return out[0], out[1]

    def write(self, kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Write ``keys``/``values`` ``[T, kv_heads, head]`` at the given absolute slots (block * size + offset)."""
        kc, vc = split_cache(kv_cache)
        _write_op()(keys.contiguous(), values.contiguous(), kc, vc, slots.to(torch.int64), self.isa)

    def check(self) -> None:
        """A round trip on random data: write through vLLM's op, read back through the learnt maps."""
        bs, H, D = self.block_size, self.kv_heads, self.head_size
        g = torch.Generator().manual_seed(5)
        cache = torch.zeros(3, H, bs, 2 * D, dtype=self.dtype)
        n = 2 * bs + 3
        k = torch.randn(n, H, D, generator=g).to(self.dtype)
        v = torch.randn(n, H, D, generator=g).to(self.dtype)
        blocks = torch.tensor([2, 0, 1])
        slots = (blocks[torch.arange(n) // bs] * bs + torch.arange(n) % bs).to(torch.int64)
        self.write(cache, k, v, slots)
        rk, rv = self.read(cache, blocks, n)
        if not (torch.equal(rk, k) and torch.equal(rv, v)):
            raise RuntimeError(f"rpc_py.vllm: reading vLLM's {self.isa} KV layout back failed its round trip check")
