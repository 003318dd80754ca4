"""rpc_py on a decoder that transformers shards over processes (``from_pretrained(..., tp_plan="auto")``).

How transformers shards attention (checked in its ``distributed/tensor_parallel.py``, 5.5 to 5.2x): the
q/k/v projections are split column-wise and ``o_proj`` row-wise (an all-reduce after it), so the rank at
coordinate ``c`` of the tensor-parallel mesh dimension computes query heads ``[c * Hq/T, (c + 1) * Hq/T)``
and KV heads ``[c * Hkv/T, (c + 1) * Hkv/T)`` (``T`` processes). The attention function and the cache of
that process see only those heads. A GQA group never straddles two ranks (``Hq/T = G * Hkv/T``), so:

* each rank's ``RPCCache`` holds its local KV heads and records its local query heads in its query ring;
* a kept set per KV head (``aggregation="group"``) needs nothing from the other ranks;
* a kept set per sequence over all heads (``aggregation="all"``) needs every rank's heads: each rank sums
  the scores over its own heads, before pooling, into ``[B, N]`` float32, one all-reduce over the group
  adds the ranks' sums, and every rank divides by the model's head count, pools, selects and compacts.
  The ranks then hold the same positions a single-process run keeps (up to float rounding of the sum);
* per-KV-head random draws hash the model's (global) KV head index, not the rank's local one.

The group is the model's own tensor-parallel process group (``model._mesh_manager.get_mesh("tp")`` in
transformers 5.2x, ``model._device_mesh`` before), found by ``find_tensor_parallel``. Every collective
rpc_py issues runs on it, at points all ranks reach in the same order (the first update of a
generation, then once per layer per compression), and turns a failure (another rank died, the group's
timeout expired) into a ``RuntimeError`` naming this rank and what it was doing.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

__all__ = ["TensorParallel", "find_tensor_parallel", "TensorParallelError", "collective_failure"]


class TensorParallelError(RuntimeError):
    """A collective of rpc_py's tensor-parallel path failed (another rank failed, stopped, or the
    process group's timeout expired)."""


def _dist():
    import torch.distributed as dist

    return dist


def _int_field(text, name):
    value = getattr(text, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel layout of a sharded model as this process sees it.

    ``group``: the torch.distributed process group the heads are sharded over; ``size`` its number of
    processes; ``rank`` this process's coordinate in it (its shard of the heads); ``q_heads`` and
    ``kv_heads``: the model's head counts (all ranks together).
    """

    group: object
    size: int
    rank: int
    q_heads: int
    kv_heads: int

    def __post_init__(self):
        for name in ("q_heads", "kv_heads"):
            heads = getattr(self, name)
            if heads % self.size != 0:
                raise ValueError(
                    f"rpc_py tensor parallel: the model's {heads} {'query' if name == 'q_heads' else 'KV'} heads "
                    f"cannot be split evenly over {self.size} processes; use a tensor-parallel size that divides "
                    f"both head counts ({self.q_heads} query, {self.kv_heads} KV)"
                )
        if self.q_heads % self.kv_heads != 0:
            raise ValueError(f"rpc_py tensor parallel: {self.q_heads} query heads is not a multiple of "
                             f"{self.kv_heads} KV heads")

    @property
    def local_q_heads(self) -> int:
        return self.q_heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads // self.size

    @property
    def kv_head_offset(self) -> int:
        """The model-wide index of this rank's first KV head."""
        return self.rank * self.local_kv_heads

    @classmethod
    def from_group(cls, group, text_config, rank: int | None = None) -> "TensorParallel":
        """The layout over ``group`` (a torch.distributed ProcessGroup) for the decoder config
        ``text_config``; ``rank``: this process's shard index (default: its rank in the group)."""
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("rpc_py: tp_group: torch.distributed is not initialized")
        q_heads = _int_field(text_config, "num_attention_heads")
        kv_heads = _int_field(text_config, "num_key_value_heads") or q_heads
        if q_heads is None:
            raise ValueError("rpc_py tensor parallel: the decoder config has no integer num_attention_heads")
        size = dist.get_world_size(group)
        if rank is None:
            rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("rpc_py: tp_group: this process is not a member of the group")
        return cls(group=group, size=size, rank=rank, q_heads=q_heads, kv_heads=kv_heads)

    # ------------------------------------------------------------------ collectives
    def _fail(self, what: str, error: BaseException) -> TensorParallelError:
        return TensorParallelError(
            f"rpc_py tensor parallel: {what} failed on rank {self.rank} of {self.size} "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
            "another rank failed or stopped, the ranks are running different generations, or the process "
            "group's timeout expired"
        )

    def failed(self, what: str, error: BaseException) -> TensorParallelError:
        """The error to raise when ``error`` (from a collective) interrupted ``what`` on this rank."""
        return self._fail(what, error)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place; returns it."""
        try:
            _dist().all_reduce(tensor, group=self.group)
        except RuntimeError as e:
            raise self._fail(what, e) from e
        return tensor

    def check_agreement(self, fields: dict, device) -> None:
        """Raise ``ValueError`` on every rank if the ranks disagree on any of ``fields`` (name -> int or
        str; strings are compared by a CRC-32). One all-gather of ``len(fields)`` int64."""
        names = list(fields)
        values = [v if isinstance(v, int) else zlib.crc32(str(v).encode()) for v in fields.values()]
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        try:
            _dist().all_gather(gathered, mine, group=self.group)
        except RuntimeError as e:
            raise self._fail("the consistency check of a new cache (all-gather)", e) from e
        table = torch.stack(gathered).cpu()
        differ = [i for i in range(len(names)) if bool((table[:, i] != table[0, i]).any())]
        if differ:
            details = "; ".join(
                f"{names[i]}: " + ", ".join(f"rank {r}: {_show(fields[names[i]], int(table[r, i]), r == self.rank)}"
                                            for r in range(self.size))
                for i in differ
            )
            raise ValueError(
                "rpc_py tensor parallel: the ranks do not run the same generation (every rank must call rpc_py "
                f"with the same RPCConfig, inputs and options); they differ in {details}"
            )


def _show(value, gathered: int, mine: bool):
    if isinstance(value, int):
        return str(gathered)
    return repr(value) if mine else f"crc {gathered:#010x}"


# ---------------------------------------------------------------------------------- detection


def _tp_mesh(model):
    """The model's tensor-parallel DeviceMesh (1-D), or None."""
    manager = getattr(model, "_mesh_manager", None)
    if manager is not None and callable(getattr(manager, "get_mesh", None)):
        try:
            mesh = manager.get_mesh("tp")
        except (KeyError, ValueError, RuntimeError, IndexError):
            mesh = None
        if mesh is not None:
            return mesh
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    if getattr(mesh, "ndim", 1) == 1:
        return mesh
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" in names:
        return mesh["tp"]
    return None


def find_tensor_parallel(model, text_config=None) -> TensorParallel | None:
    """The tensor-parallel layout of ``model`` when transformers sharded its heads over more than one
    process (``tp_plan``), else None."""
    tp_size = getattr(model, "_tp_size", None)
    if not isinstance(tp_size, int) or tp_size <= 1:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    mesh = _tp_mesh(model)
    if mesh is None:
        raise NotImplementedError(
            f"rpc_py: {type(model).__name__} is tensor parallel (tp_size={tp_size}) but its device mesh has no "
            "tensor-parallel dimension rpc_py can find; pass RPCCache(..., tp_group=<the tensor-parallel "
            "process group>)"
        )
    if mesh.size() != tp_size:
        raise NotImplementedError(
            f"rpc_py: the tensor-parallel mesh of {type(model).__name__} has {mesh.size()} processes but "
            f"model tp_size is {tp_size}"
        )
    if text_config is None:
        text_config = model.config.get_text_config(decoder=True)
    return TensorParallel.from_group(mesh.get_group(), text_config, rank=mesh.get_local_rank())


def collective_failure(error: BaseException) -> bool:
    """Whether ``error`` was raised by a torch.distributed collective (a peer closed its connection,
    a timeout), as opposed to an error of this rank's own computation."""
    if isinstance(error, TensorParallelError) or not isinstance(error, RuntimeError):
        return False
    dist_error = getattr(_dist(), "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    tb = error.__traceback__
    while tb is not None:
        if "torch/distributed/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False
