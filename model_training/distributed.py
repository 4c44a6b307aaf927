"""Multi-process training helpers (DistributedDataParallel), no-ops in a single process.

``torchrun --nproc-per-node N -m model_training train ...`` starts N processes; each finds
its rank in the environment torchrun sets. NCCL on GPUs, gloo on CPU. Every rank sees the
same shuffled order each epoch and takes an equal, disjoint share of it, so N ranks with
batch B take the same samples per step as one process with batch N*B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, order: np.ndarray) -> np.ndarray:
        """This rank's share: equal sizes (DDP needs the same number of steps on every rank)."""
        if not self.enabled:
            return order
        usable = len(order) - len(order) % self.world
        return order[:usable][self.rank :: self.world]

    def broadcast_str(self, value: str | None) -> str:
        if not self.enabled:
            assert value is not None
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        assert box[0] is not None
        return str(box[0])

    def broadcast_flag(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(x) for x in t.tolist()]

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        # asked for a GPU: training on the CPU instead would be a surprise, hours later
        from .data import DataError

        raise DataError("--device cuda: torch sees no CUDA device here (a CPU-only torch, or no GPU); use --device auto or cpu")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
