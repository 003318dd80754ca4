"""Pure-Python/NumPy model of ``rpc_py._C.KVCache`` for the stateful fuzz test (tests/test_fuzz.py).

The model keeps, per layer, the logical contents the cache must hold (float64 copies of exactly the
values that were appended, so comparisons are bit-exact after casting back), the lengths, the query
ring as "the last `window` queries" (their order inside the ring is irrelevant to scoring, so the
model never mirrors the C ring's slot layout) and the padding counts. It shares no code with the C
extension; compression is judged against ``rpc_py.reference`` (float64 torch oracle) scores.

What the model deliberately does not pin down: the growth policy (only "capacity >= length",
"a fixed cache never grows" and "generation changes exactly when the block is reallocated").
"""

from __future__ import annotations

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - the fuzz tests importorskip torch
    torch = None


class ClosedError(Exception):
    """Raised by the model where the real cache must raise ValueError('KVCache is closed')."""


class LayerModel:
    def __init__(self, B, H, D):
        self.keys = np.zeros((B, H, 0, D))
        self.values = np.zeros((B, H, 0, D))
        self.seen = 0
        self.queries = None  # float64 [B, Hq, n, D], the most recent n <= window queries, oldest first
        self.recorded = 0
        self.placed = False

    @property
    def length(self):
        return self.keys.shape[2]


class CacheModel:
    def __init__(self, num_layers, B, H, D, dtype, *, capacity=0, fixed_capacity=False, window=0, q_heads=0):
        self.num_layers, self.B, self.H, self.D = num_layers, B, H, D
        self.dtype = dtype
        self.capacity0 = capacity
        self.fixed = fixed_capacity
        self.window = window
        self.q_heads = q_heads
        self.layers = [LayerModel(B, H, D) for _ in range(num_layers)]
        self.padding = (0,) * B
        self.closed = False

    # ---------------------------------------------------------------------------------- operations
    def _live(self):
        if self.closed:
            raise ClosedError

    def append(self, layer, k, v):
        """k, v: float64 arrays of the logical input values [B, H, t, D]."""
        self._live()
        ly = self.layers[layer]
        ly.keys = np.concatenate([ly.keys, k], axis=2)
        ly.values = np.concatenate([ly.values, v], axis=2)
        ly.seen += k.shape[2]
        ly.placed = True
        return ly.length

    def would_overflow_fixed(self, layer, t, capacity_now):
        """True when a fixed-capacity cache must refuse growing `layer` by t tokens."""
        if not self.fixed:
            return False
        limit = capacity_now if capacity_now > 0 else self.capacity0
        return self.layers[layer].length + t > limit

    def record_query(self, layer, q):
        self._live()
        ly = self.layers[layer]
        if self.q_heads == 0:
            self.q_heads = q.shape[1]
        ly.queries = q if ly.queries is None else np.concatenate([ly.queries, q], axis=2)
        ly.queries = ly.queries[:, :, max(0, ly.queries.shape[2] - self.window):]
        ly.recorded += q.shape[2]
        ly.placed = True
        return min(ly.recorded, self.window)

    def num_queries(self, layer):
        return min(self.layers[layer].recorded, self.window)

    def can_compress(self, layer, start):
        ly = self.layers[layer]
        return (self.window > 0 and self.num_queries(layer) == self.window
                and 0 <= start < ly.length - self.window)

    def oracle_scores(self, layer, start, aggregation, pooling, kernel_size):
        """Pooled float64 scores [B, A, N] of the candidates [start, length - window) (reference.py)."""
        from rpc_py.reference import score_reference

        ly = self.layers[layer]
        q = torch.from_numpy(ly.queries)
        k = torch.from_numpy(ly.keys)
        pooled, _ = score_reference(q, k, start, ly.length - self.window, aggregation, pooling, kernel_size)
        return pooled.numpy()

    def compress(self, layer, start, indices):
        """Applies a compression that kept `indices` ([B, A, keep], offsets from start)."""
        self._live()
        ly = self.layers[layer]
        end = ly.length - self.window
        B, A, keep = indices.shape
        idx = np.broadcast_to(indices, (B, self.H, keep)) if A == 1 else indices
        pos = np.concatenate(
            [np.broadcast_to(np.arange(start), (B, self.H, start)), idx + start,
             np.broadcast_to(np.arange(end, ly.length), (B, self.H, ly.length - end))], axis=2)
        gather = np.broadcast_to(pos[..., None], pos.shape + (self.D,))
        ly.keys = np.take_along_axis(ly.keys, gather, axis=2)
        ly.values = np.take_along_axis(ly.values, gather, axis=2)
        return ly.length

    def set_padding(self, counts):
        self._live()
        self.padding = tuple(int(c) for c in counts)

    def reset(self):
        self._live()
        for ly in self.layers:
            placed = ly.placed
            ly.__init__(self.B, self.H, self.D)
            ly.placed = placed
        self.padding = (0,) * self.B

    def close(self):
        self.closed = True


def check_selection(pooled_oracle, pooled_c, indices, keep, *, tol=2e-5):
    """Asserts that `indices` is a correct top-`keep` selection of the oracle scores.

    Exact index equality with the oracle is not required where scores are within `tol` of each other
    (float32 kernels vs a float64 oracle may order near-ties differently); a kept candidate may never
    score clearly below a dropped one. Returns nothing; raises AssertionError with a reason.
    """
    B, A, N = pooled_oracle.shape
    assert indices.shape == (B, A, keep), f"indices shape {indices.shape} != {(B, A, keep)}"
    assert indices.dtype == np.int64
    np.testing.assert_allclose(pooled_c, pooled_oracle, rtol=1e-4, atol=1e-6)
    for b in range(B):
        for a in range(A):
            row = indices[b, a]
            assert np.all(np.diff(row) > 0), f"indices not strictly ascending: {row}"
            assert keep == 0 or (row[0] >= 0 and row[-1] < N), f"indices out of [0, {N}): {row}"
            if 0 < keep < N:
                mask = np.zeros(N, bool)
                mask[row] = True
                s = pooled_oracle[b, a]
                scale = max(1.0, float(np.max(np.abs(s))))
                assert s[mask].min() >= s[~mask].max() - tol * scale, (
                    f"row ({b},{a}): kept score {s[mask].min()} < dropped score {s[~mask].max()}")
