"""Process-group setup for ``torchrun`` (DDP): gloo on CPU, nccl on GPU; single-process otherwise."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a process group was joined: DDP wraps the model, even for one process under torchrun

    @property
    def enabled(self) -> bool:
        return self.group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def job_id() -> str | None:
    """torchrun's id of this job (its ``--rdzv-id``; a new one per ``--standalone`` launch), None outside torchrun.

    Every worker of the job has it, through every restart. It, not ``TORCHELASTIC_RESTART_COUNT``, tells a restarted
    worker that it belongs to the run it finds: each node counts restarts for itself, and a node whose own worker
    did not fail starts it again with the count still 0 (seen here on a two-node restart, which then hung with
    one rank resuming and the other starting over; pytorch/pytorch#135712 describes the same)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    Under torchrun a single process joins one too, as PyTorch's DDP examples do, so ``--nproc_per_node=1`` on one
    GPU runs the same DDP + nccl path as eight; without torchrun, training is single-process."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                    group=True)  # fmt: skip
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return info


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place. nccl reduces GPU tensors only: a CPU tensor goes through the rank's GPU."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


T = TypeVar("T")


def main_first(info: DistInfo, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the other ranks: what rank 0 computed and cached, they read back."""
    result = None
    for turn in (True, False):
        if info.is_main == turn:
            result = fn()
        barrier()
    return result  # type: ignore[return-value]


def all_gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (just ``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
