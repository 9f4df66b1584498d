"""Data-parallel training across processes and machines: torchrun and DistributedDataParallel.

    torchrun --standalone --nproc-per-node 2 -m mp4sr_cli train ...      # or: mp4sr-rt train --nproc 2
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
             --nproc-per-node 8 -m mp4sr_cli train --out /shared/run ...  # two machines

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `World.from_environment` joins the process group
(gloo on CPU, NCCL on GPU, one GPU per local rank). Every rank builds the same global batches (same
seed) and trains on its share of each (every `size`-th row; a batch's last rows that do not fill
every rank's share equally are left out), in-batch losses see the whole batch's negatives
(`gather`), and DDP averages the gradients, so a step is the single-process step on the whole
batch (up to floating-point summation order, and with the per-rank random draws of dropout and
mixup). Rank 0 alone writes the run directory (checkpoints,
state, metrics, curves), which on several machines must be shared storage; every rank validates
(the same numbers) so that all stop at the same epoch. `--resume` after any rank is killed reads
the last completed epoch on every rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> World:
        """The process group torchrun describes, joined; a single process without torchrun."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU under torchrun."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.size > 1 else device

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (writing what the others then read), then the others."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def shard(self, rows):
        """This rank's share of a global batch: every `size`-th row from `rank`."""
        return rows[self.rank::self.size]

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def gather(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, int]:
    """Every rank's `x` concatenated along `dim` in rank order, differentiable (the gradient of
    each part goes back to its rank), and where this rank's part starts. In-batch losses
    (pre-training's NIP and CMCL, the sampled softmax's in-batch negatives) use it so that a
    batch split across ranks keeps the whole batch's negatives. Without torchrun: (x, 0). Every
    rank's part must have the same shape."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    flat = x.movedim(dim, 0).contiguous()
    whole = _AllGather.apply(flat) if x.requires_grad else _all_gather(flat)
    return whole.movedim(0, dim), dist.get_rank() * x.shape[dim]


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward sends each rank the summed gradient of its part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every part
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `mp4sr-rt ARGV` under torchrun with `nproc` processes on this machine; its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mp4sr_cli", *argv]
    return subprocess.call(cmd)
