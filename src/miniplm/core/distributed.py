"""torch.distributed for stages launched by torchrun: gloo on CPU, nccl on GPU; no-ops in one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, else (0, 1, 0)."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> bool:
    """Join the process group when launched with several ranks; True when distributed."""
    if rank_world()[1] <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else rank_world()[2])
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def initialized() -> bool:
    return dist.is_initialized()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
