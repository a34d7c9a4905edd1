"""Process-group setup for ``torchrun`` (``env://``): NCCL on GPU, gloo on CPU.

A plain ``python -m spotdiff pretrain ...`` is a world of one process and never touches
``torch.distributed``. Under ``torchrun --nproc-per-node N [--nnodes M ...]`` the variables
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set and one process group is created -- also for
``N = 1``, so a one-GPU ``torchrun`` runs the multi-GPU code path (NCCL, SyncBatchNorm, DDP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spotdiff.devices import resolve_device
from spotdiff.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool = False  # started by torchrun: a process group exists even for one process

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, checkpoints and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is in use (DDP, SyncBatchNorm on GPU, all-reduce)."""
        return self.world_size > 1 or self.launched


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def init_distributed(device: str = "auto") -> DistContext:
    """Create the process group when launched by torchrun, and pick this process's device.

    Args:
        device: a name :func:`spotdiff.devices.resolve_device` takes: ``auto`` (CUDA when available),
            ``cpu``, ``cuda`` (under torchrun, the GPU of ``LOCAL_RANK``) or ``cuda:N`` (one process only).
    """
    chosen = resolve_device(device)
    use_cuda = chosen.type == "cuda"
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        if chosen.index is not None and (world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ):
            raise ConfigError(f"device {device!r}: under torchrun use cuda (each process takes its LOCAL_RANK's GPU)")
        index = local_rank if chosen.index is None else chosen.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    launched = "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun
    if (world_size > 1 or launched) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", device_id=dev if use_cuda else None)
    return DistContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev, launched=launched and dist.is_initialized()
    )


def cleanup_distributed() -> None:
    """Destroy the process group if this module (or anyone) created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``values`` over all processes (returned as-is in a world of one)."""
    if not ctx.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / ctx.world_size


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op in a world of one)."""
    if ctx.distributed:
        dist.barrier()
