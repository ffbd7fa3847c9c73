"""Data-parallel pretraining under torchrun: the same command on one process, several GPUs or several nodes.

Why torchrun rather than Accelerate: it ships with torch, so it adds no dependency and cannot pull in a
second torch build. It is also the launcher Accelerate and diffusers' scripts start underneath, and its
launch lines are the same on one machine and many nodes. What pretraining needs from a framework is small:
- each process computes its slice of every global batch (`BatchPart`; random draws are made for the whole
  batch, so any number of processes computes what one process would);
- gradients are averaged over processes after each backward (one flat all-reduce);
- the loss logged is the mean over processes;
- only rank 0 keeps the EMA, writes checkpoints, shows progress and exports.

The global batch (`pretrain.batch_size`) is fixed, not the per-process batch. So the run's identity, its
checkpoints and its resume do not depend on the number of processes, and a run resumes at any world size.
`--out` must be on storage every node sees: rank 0 writes the checkpoint, and every rank reads it on resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from pathseg.pretrain.data import BatchPart

from pathseg.errors import PathsegError, ReportedElsewhere

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the ones torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def part(self, batch_size: int) -> BatchPart:
        if batch_size % self.world:
            raise PathsegError(f"pretrain.batch_size {batch_size} does not split over {self.world} processes; use a "
                               f"batch size divisible by {self.world}, or another number of processes")
        return BatchPart.of_process(batch_size, self.rank, self.world)


ONE_PROCESS = Processes()


def processes_from_environment() -> Processes:
    """What torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); nothing set is a single process."""
    try:
        return Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                         int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise PathsegError("RANK, WORLD_SIZE or LOCAL_RANK is not a number; start pathseg pretrain with torchrun "
                           "or --processes") from None


def device_of(processes: Processes, device: torch.device) -> torch.device:
    """One GPU per process on its node (LOCAL_RANK); CPU processes share the CPU."""
    if device.type != "cuda" or not processes.parallel:
        return device
    if processes.local_rank >= torch.cuda.device_count():
        raise PathsegError(f"process {processes.rank} wants GPU {processes.local_rank}, but this node has "
                           f"{torch.cuda.device_count()}; start at most that many processes per node")
    torch.cuda.set_device(processes.local_rank)
    return torch.device("cuda", processes.local_rank)


def start(processes: Processes, device: torch.device) -> None:
    if processes.parallel and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop(processes: Processes) -> None:
    if processes.parallel and dist.is_initialized():
        dist.destroy_process_group()


def decided_by_main(processes: Processes, decide: Callable[[], T]) -> T:
    """Rank 0 decides (reads and changes files), every rank gets its answer; a refusal is raised on every rank,
    so no process waits forever for one that stopped."""
    if not processes.parallel:
        return decide()
    outcome: list = [None, None]
    if processes.main:
        try:
            outcome = [decide(), None]
        except PathsegError as error:
            outcome = [None, str(error)]
    dist.broadcast_object_list(outcome, src=0)  # small, and only ever between this run's own processes
    if outcome[1] is not None:
        raise (PathsegError if processes.main else ReportedElsewhere)(outcome[1])
    return outcome[0]


def mean_over_processes(values: list[float], processes: Processes) -> list[float]:
    if not processes.parallel:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / processes.world).tolist()


def average_gradients(parameters: list[torch.nn.Parameter], processes: Processes) -> None:
    """Every process ends with the mean gradient. A parameter no process gave a gradient keeps none, as in
    one process (AdamW skips it); one that only some gave counts zero for the others."""
    if not processes.parallel:
        return
    device = parameters[0].device
    has = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=device)
    dist.all_reduce(has)
    used = [p for p, count in zip(parameters, has.tolist(), strict=True) if count > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat)
    flat /= processes.world
    offset = 0
    for p in used:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def broadcast_parameters(modules: list[torch.nn.Module], processes: Processes) -> None:
    """Rank 0's weights everywhere: seeded inits already agree, this makes sure across devices and libraries."""
    if not processes.parallel:
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
