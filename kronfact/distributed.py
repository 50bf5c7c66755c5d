"""Running one training call on N processes: torchrun's environment, DDP or FSDP2, collective helpers.

Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1) :func:`init_distributed` starts the process
group from the environment (nccl on CUDA, gloo on CPU); :func:`wrap` puts the model in
DistributedDataParallel or FSDP2; one process gets :class:`Dist` () and the model itself.

>>> init_distributed(torch.device("cpu"))  # no torchrun here
Dist(rank=0, world=1, local_rank=0, created=False)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import KronfactError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, local rank; ``created``: we started the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); world 1 otherwise."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise KronfactError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, created=True)


def all_mean(value: Tensor, d: Dist) -> float:
    if d.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= d.world
    return float(value)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def fully_shard_fn() -> Callable[..., nn.Module]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap(model: nn.Module, d: Dist, device: torch.device, fsdp: bool, find_unused: bool) -> nn.Module:
    """DistributedDataParallel, or FSDP2 (``fully_shard``: one unit per block named in transformers'
    ``_no_split_modules``, then the root; works on CPU with gloo too); the model itself on one process."""
    if d.world == 1:
        return model
    if fsdp:
        with torch.no_grad():  # start every rank from rank 0's weights, as DDP does
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, 0)
        shard = fully_shard_fn()
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in list(model.modules())[1:]:
            if type(module).__name__ in blocks:
                shard(module)
        return shard(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def no_sync(model: nn.Module, skip: bool) -> Any:
    """Skip the gradient all-reduce of a non-final micro-batch (DDP's no_sync, FSDP2's flag)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(not skip)
        return nullcontext()
    return model.no_sync() if skip else nullcontext()
