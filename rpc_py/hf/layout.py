"""Where each physical slot of a compressed layer came from, and masks over that physical layout.

A layer of ``RPCCache`` holds fewer tokens than it has seen once RPC has compressed it. Every token
that entered the layer has a *logical position*: its index in the sequence of tokens the layer has
seen (prompt columns with their padding, then every appended token, across turns), which is also
its column in the 2-D attention mask that ``generate`` keeps and in the attention of an uncompressed
cache. ``SlotPositions`` keeps, per layer, the logical position of every physical slot, per KV head
when ``aggregation="group"`` lets the heads keep different tokens (shape ``[batch, A, length]`` with
A = 1 or kv_heads).

The map is stored compactly: a compression freezes the positions of the slots it produced up to the
end of the kept set; every slot after that holds consecutive positions that end at the last token
seen (appends are always in order, and the recent window a compression keeps is the most recent
tokens). Appending therefore costs nothing; the full map is built on demand, and a compression
turns the kept indices returned by the C cache into the next frozen part. ``keep_history`` also
keeps every earlier frozen part, so the layout that any past step attended over can be rebuilt
(mapping ``output_attentions`` columns to tokens).

``physical_mask`` turns transformers' mask, built over logical positions (``RPCCacheLayer`` reports
the logical length in ``get_mask_sizes``), into the mask over the physical slots by gathering its
columns: causal order, padding anywhere (also inside a follow-up turn) and sliding windows all come
out as transformers computed them for the uncompressed sequence.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["SlotPositions", "physical_mask"]


@dataclasses.dataclass
class _Segment:
    """The layout from one compression (or the start) until the next one."""

    seen: int  # tokens seen when it began (after that step's append)
    frozen: torch.Tensor | None  # int64 [B, A, n] positions of slots [0, n); None when n == 0
    n: int
    tail: int  # consecutive slots after the frozen part when it began


class SlotPositions:
    """Logical position of every physical slot of one layer (see the module docstring)."""

    def __init__(self, keep_history: bool = False):
        self.keep_history = keep_history
        self.reset()

    def reset(self) -> None:
        self.segments = [_Segment(seen=0, frozen=None, n=0, tail=0)]

    @property
    def identity(self) -> bool:
        """True while no compression has moved any slot (physical slot i holds token i)."""
        last = self.segments[-1]
        return last.n == 0 and last.seen == last.tail

    def _segment(self, seen: int, current: bool) -> _Segment:
        if current:
            return self.segments[-1]
        # A compression at `seen` runs after that step's attention: the step that brought the count
        # to `seen` attended over the layout from before it.
        for seg in reversed(self.segments):
            if seg.seen < seen:
                return seg
        first = self.segments[0]
        if first.seen == 0:
            return first
        raise ValueError(
            f"logical_positions: seen={seen}: the layout of that step is no longer known (the earliest kept is "
            f"seen={first.seen + 1}); create the RPCCache with keep_layouts=True (rpc_py.generate does so when "
            "output_attentions=True)"
        )

    def positions(self, seen: int, length: int | None, device, batch: int, current: bool = False) -> torch.Tensor:
        """int64 ``[batch or B, A, length]``: the logical position of each physical slot when the layer
        had seen ``seen`` tokens; ``current``: the layout now (after a compression at this step)."""
        seg = self._segment(seen, current)
        start = seg.seen - seg.tail
        expected = seg.n + (seen - start)
        if length is not None and expected != length:
            raise RuntimeError(f"SlotPositions: expected {expected} physical slots after {seen} tokens, got {length}")
        tail = torch.arange(start, seen, device=device, dtype=torch.int64)
        if seg.frozen is None:
            return tail.expand(batch, 1, seen - start)
        frozen = seg.frozen.to(device)
        b, a, _ = frozen.shape
        return torch.cat([frozen, tail.expand(b, a, seen - start)], dim=2)

    def compacted(self, seen: int, length_before: int, start: int, indices: torch.Tensor, window: int,
                  batch: int) -> None:
        """Record a compaction of the slots ``[start, length_before - window)`` that kept ``indices``
        (``[B, A, keep]`` offsets from ``start``) followed by the last ``window`` slots."""
        full = self.positions(seen, length_before, indices.device, batch, current=True)
        indices = indices.to(device=full.device, dtype=torch.int64)
        b, a, keep = indices.shape
        heads = max(a, full.shape[1])
        full = full.expand(b, heads, length_before)
        kept = full[:, :, start : length_before - window].gather(2, indices.expand(b, heads, keep))
        new = torch.cat([full[:, :, :start], kept, full[:, :, length_before - window :]], dim=2)
        last = self.segments[-1]
        if window <= length_before - last.n:  # the recent window is consecutive: freeze only what precedes it
            n, tail = start + keep, window
        else:
            n, tail = new.shape[2], 0
        segment = _Segment(seen=seen, frozen=new[:, :, :n].contiguous() if n else None, n=n, tail=tail)
        if self.keep_history:
            self.segments.append(segment)
        else:
            self.segments = [segment]


def physical_mask(mask: torch.Tensor | None, positions: torch.Tensor, q: int, seen: int, q_heads: int):
    """The attention mask over a layer's physical slots.

    ``mask``: transformers' 4-D mask over logical key positions (``[B, 1 or heads, q, >= seen]``, bool
    or additive float) or None; ``positions``: ``[B, A, L]`` logical position of each physical key
    slot (the step's new tokens included); ``seen``: tokens seen after this step's append. Returns a
    mask ``[B, 1 or q_heads, q, L]`` of the same kind, or None when no mask is needed.
    """
    batch, groups, length = positions.shape
    if groups > 1:  # one kept set per KV head: expand to the query heads that read it (GQA)
        positions = positions.repeat_interleave(q_heads // groups, dim=1)
    if mask is None:
        if q == 1:
            return None  # one query token and no padding: every held token is visible
        query = torch.arange(seen - q, seen, device=positions.device)
        return positions[:, :, None, :] <= query[None, None, :, None]  # causal order of logical positions
    if mask.dim() != 4 or mask.shape[-1] < seen or mask.shape[1] not in (1, positions.shape[1], q_heads):
        raise ValueError(
            f"RPCCache: expected a 4-D attention mask [batch, 1 or heads, q, >= {seen}] over the logical key "
            f"positions, got shape {tuple(mask.shape)} (a compressed layer gathers it onto its physical slots)"
        )
    heads = max(mask.shape[1], positions.shape[1])
    rows = mask.shape[2]
    idx = positions.to(mask.device)[:, :, None, :].expand(batch, heads, rows, length)
    return mask.expand(batch, heads, rows, mask.shape[3]).gather(3, idx)
