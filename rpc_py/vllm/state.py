"""What the vLLM worker keeps per request and per layer for RPC, and the work of one decode step.

Per (request, layer): the selector-query ring (the last R decode queries, only recorded in the R steps
before a compression), H2O's accumulated attention when the policy needs it, the number of
compressions, and the logical position of every physical slot (what the tests compare with
``rpc_py.generate``'s ``RPCCache.logical_positions``). The K/V themselves stay in vLLM's paged cache;
a compression reads the request's tokens (``PagedLayout.read``), scores them with rpc_py's kernels
through the policy object (the same ``ScoreContext`` code ``RPCCache`` runs), selects with
``_C.select`` and writes the kept tokens and the recent window back into the request's own first
slots through vLLM's write op. The slots past the new length are dropped: the scheduler returns the
blocks that held only them to the pool.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from .. import _C
from ..policies import ScoreContext

__all__ = ["StepEntry", "Step", "RequestState", "LayerState", "WORKER", "current_step", "set_step"]


@dataclasses.dataclass
class StepEntry:
    """One request of the batch in this step (set by the runner before the forward pass)."""

    req_id: str
    row: int             # its row in the batch (attention metadata order)
    rpc: object          # RPCConfig, or None
    prompt_len: int
    plan: object         # settings.StepPlan of a decode step under RPC, else None


@dataclasses.dataclass
class Step:
    entries: list

    @property
    def active(self) -> bool:
        return any(e.plan is not None for e in self.entries)


_local = threading.local()


def set_step(step: Step | None) -> None:
    _local.step = step


def current_step() -> Step | None:
    return getattr(_local, "step", None)


class _Ring:
    """The ``kvcache`` a ``ScoreContext`` reads: this layer's query ring and accumulator."""

    def __init__(self, layer_state: "LayerState", length: int):
        self.s, self.length = layer_state, length

    def queries(self, layer):
        return self.s.ring

    def num_queries(self, layer):
        return min(self.s.recorded, self.s.ring.shape[2]) if self.s.ring is not None else 0

    def ring_position(self, layer):
        return self.s.ring_pos

    def accumulator(self, layer):
        return self.s.acc[:, :, : self.length]


class LayerState:
    def __init__(self, track_positions: bool):
        self.ring = None          # [1, Hq, R, D], the model dtype
        self.recorded = 0
        self.ring_pos = 0
        self.acc = None           # [1, Hkv, capacity] float32 (H2O)
        self.compressions = 0
        self.track = track_positions
        self.frozen = None        # int64 [A, n]: logical positions of physical slots [0, n)
        self.tail_base = 0        # slot n + i holds logical position tail_base + i

    # -- the query ring
    def record(self, q: torch.Tensor, window: int) -> None:
        if self.ring is None:
            self.ring = torch.zeros(1, q.shape[1], window, q.shape[3], dtype=q.dtype)
        self.ring[:, :, self.ring_pos] = q[:, :, 0]
        self.ring_pos = (self.ring_pos + 1) % window
        self.recorded += 1

    # -- H2O
    def accumulate(self, q: torch.Tensor, keys: torch.Tensor, length: int) -> None:
        """keys [1, Hkv, length, D] (the step's token included)."""
        if self.acc is None or self.acc.shape[2] < length:
            cap = max(256, 2 * (self.acc.shape[2] if self.acc is not None else 0), length)
            grown = torch.zeros(1, keys.shape[1], cap, dtype=torch.float32)
            if self.acc is not None:
                grown[:, :, : self.acc.shape[2]] = self.acc
            self.acc = grown
        _C._accumulate(q, keys, self.acc[:, :, :length])

    # -- the layout
    def positions(self, length: int) -> torch.Tensor:
        n = 0 if self.frozen is None else self.frozen.shape[1]
        tail = torch.arange(self.tail_base, self.tail_base + length - n, dtype=torch.int64)
        if self.frozen is None:
            return tail[None]
        return torch.cat([self.frozen, tail.expand(self.frozen.shape[0], -1)], dim=1)

    # -- one compression
    def compress(self, rpc, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, start: int, keep: int,
                 q_heads: int, write) -> None:
        """keys/values [L, Hkv, D] in token order; ``write(k, v, first_slot)`` stores [T, Hkv, D] at the
        request's physical slots first_slot .. first_slot + T - 1."""
        L, Hkv, _ = keys.shape
        window = rpc.window
        end = L - window
        k4 = keys.permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, L, D]
        ctx = ScoreContext(kvcache=_Ring(self, L), layer=layer_idx, compression=self.compressions, start=start,
                           end=end, length=L, window=window, q_heads=q_heads, kv_heads=Hkv, batch=1, padding=[0],
                           keys=k4)
        scores = rpc.policy.scores(ctx).to(torch.float32).contiguous()
        indices = torch.empty(1, scores.shape[1], keep, dtype=torch.int64)
        _C.select(scores, keep, out=indices)
        rows = indices[0]  # [A, keep]
        src = torch.cat([rows + start, torch.arange(end, L).expand(rows.shape[0], window)], dim=1)  # [A, keep + R]
        if src.shape[0] == 1:
            new_k, new_v = keys[src[0]], values[src[0]]
        else:
            heads = torch.arange(Hkv)[None, :]
            new_k, new_v = keys[src.t(), heads], values[src.t(), heads]  # [keep + R, Hkv, D]
        write(new_k, new_v, start)
        new_length = start + keep + window
        if self.acc is not None:
            acc = self.acc[0]
            moved = acc[:, :L].gather(1, src.expand(Hkv, -1)) if src.shape[0] == 1 else acc[:, :L].gather(1, src)
            acc[:, start:new_length] = moved
            acc[:, new_length:L] = 0
        if self.track:
            full = self.positions(L)
            full = full.expand(src.shape[0], -1) if full.shape[0] < src.shape[0] else full
            kept = full.gather(1, src.expand(full.shape[0], -1) if src.shape[0] == 1 else src)
            new = torch.cat([full[:, :start], kept], dim=1)
            self.frozen = new[:, : start + keep].clone()
            self.tail_base = int(full[0, end])
        self.compressions += 1


class RequestState:
    def __init__(self, rpc, prompt_len: int, track_positions: bool):
        self.rpc, self.prompt_len, self.track = rpc, prompt_len, track_positions
        self.layers: dict[int, LayerState] = {}
        self.length = 0  # physical tokens after the latest step

    def layer(self, idx: int) -> LayerState:
        st = self.layers.get(idx)
        if st is None:
            st = self.layers[idx] = LayerState(self.track)
        return st


class WorkerState:
    """Every request's state on this worker, plus the kept positions of recently finished requests
    (when recorded, for tests and debugging)."""

    def __init__(self):
        self.requests: dict[str, RequestState] = {}
        self.finished: dict[str, dict] = {}
        self.track_positions = False
        self.keep_finished = 512

    def get(self, req_id: str, rpc, prompt_len: int) -> RequestState:
        st = self.requests.get(req_id)
        if st is None:
            st = self.requests[req_id] = RequestState(rpc, prompt_len, self.track_positions)
        return st

    def reset(self, track_positions: bool) -> None:
        """A new engine in this process: forget every request of the previous one."""
        self.requests.clear()
        self.finished.clear()
        self.track_positions = track_positions

    def finished_positions(self, request_id: str):
        """The recorded layout of a finished request, by the id vLLM uses inside the engine or by the id
        it was given (vLLM appends ``-`` and 8 random characters to it); the latest such request wins."""
        for table in (self.finished, self.requests):  # vLLM tells the worker a request ended one step later
            hits = [k for k in table if k == request_id or k.rsplit("-", 1)[0] == request_id]
            if hits:
                got = table[hits[-1]]
                return got if table is self.finished else self._layout(got)
        return None

    @staticmethod
    def _layout(st: "RequestState") -> dict:
        return {"length": st.length, "layers": {i: s.positions(st.length).tolist() for i, s in st.layers.items()}}

    def drop(self, req_id: str, keep: bool = True) -> None:
        """Forget a request (finished, or preempted: ``keep=False``); with position tracking a finished
        request's layout stays readable (``rpc_py_kept_positions``)."""
        st = self.requests.pop(req_id, None)
        if st is not None and self.track_positions and keep:
            self.finished[req_id] = self._layout(st)
            while len(self.finished) > self.keep_finished:
                self.finished.pop(next(iter(self.finished)))


WORKER = WorkerState()
