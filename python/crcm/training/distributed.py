"""Multi-process training: process group, FSDP2 sharding and the rank-aware helpers (design §8).

``torchrun --nproc-per-node N -m crcm.cli train STAGE …`` starts N processes; :func:`setup`
reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``)
and joins the process group (NCCL on CUDA, gloo on CPU). A plain ``python -m crcm.cli train``
runs with world size 1 and never touches ``torch.distributed``.

What is sharded (``torch.distributed.fsdp.fully_shard``, one FSDP unit per transformer block
plus the root for the embeddings and the head):

- the student, its EMA and the fake score: they carry fp32 weights, and the student and the
  fake score also gradients and two AdamW moments, so sharding divides ~4 copies by N;
- **not** the frozen teachers: they hold one copy of the weights and nothing else, are called
  several times per step (CFG doubles the batch), and a replicated copy needs no all-gather per
  forward. Shard them too once a teacher no longer fits next to the student's shard.

Checkpoints stay in the single-process safetensors format (see :mod:`crcm.training.checkpoint`):
every sharded tensor is gathered (:func:`full_tensor`, a collective) and rank 0 writes the files;
loading reads the full tensors on every rank and keeps each rank's shard (:func:`like`). So a run
may resume on another number of processes, and nothing is ever pickled. Gathering needs the
full model in rank 0's CPU memory, which is fine at the sizes crcm trains;
``torch.distributed.checkpoint`` would be the next step beyond that.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistEnv",
    "all_reduce_mean",
    "all_true",
    "barrier",
    "full_tensor",
    "gathered_params",
    "is_sharded",
    "like",
    "rank",
    "setup",
    "shard",
    "teardown",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this process group was created by setup() and is destroyed by teardown()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Joins torchrun's process group when ``WORLD_SIZE`` > 1; a no-op for a single process.

    ``device="auto"`` picks ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    world = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and world > 1:
            dev = torch.device(f"cuda:{local_rank}")
    if world <= 1:
        return DistEnv(0, 1, dev, owns_group=False)
    if not dist.is_available():  # pragma: no cover - every supported build has it
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev, owns_group=owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Sharding


def shard(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """FSDP2-shards a ``CausalDiT`` in place (a unit per block, then the root) over all ranks.

    Parameters become ``DTensor`` shards (``Shard(0)``); forwards all-gather a block's weights
    just before it runs and free them after (``reshard_after_forward``). Weights, gradients and
    optimizer state stay fp32: mixed precision is autocast's job (see the trainer).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in getattr(module, "blocks", ()):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: torch.nn.Module) -> bool:
    return bool(_fsdp_units(module))


@contextlib.contextmanager
def gathered_params(module: torch.nn.Module) -> Iterator[None]:
    """All-gathers every FSDP unit's weights for code that reads parameters outside
    ``module(...)`` — the layer-wise JVP (``crcm.training.jvp``) calls the blocks' sub-layers
    directly, so no FSDP hook would gather them. A forward inside the block reshards as usual
    (and the backward gathers again), so gradients are unaffected. A no-op when not sharded."""
    units = _fsdp_units(module)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


# ---------------------------------------------------------------------------------------------
# Tensors and reductions


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` shard (a collective: every rank must call it, in the
    same order); any other tensor as is."""
    return t.full_tensor() if _is_dtensor(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (any other tensor as is)."""
    return t.to_local() if _is_dtensor(t) else t


def like(full: Tensor, reference: Tensor) -> Tensor:
    """``full`` laid out as ``reference``: this rank's shard when ``reference`` is a ``DTensor``
    (every rank holds the same ``full``, so each slices its own shard — no communication)."""
    if not _is_dtensor(reference):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=reference.device, dtype=reference.dtype)
    # src_data_rank=None: each rank keeps its slice of its own (identical) copy, no broadcast.
    try:
        return distribute_tensor(
            full, reference.device_mesh, reference.placements, src_data_rank=None
        )
    except TypeError:  # pragma: no cover - torch without src_data_rank
        return distribute_tensor(full, reference.device_mesh, reference.placements)


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (ranks must agree on skipping a step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of every value (same keys on every rank, in the same order)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = list(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}
