"""Data-parallel training on ``torch.distributed``: one process per device, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 -m selfattn.cli train ...

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` reads them and joins
the process group (gloo on the CPU, nccl on CUDA). Without them it returns a single-process
:class:`World` and nothing is initialised, so the same code runs both ways.

Every rank builds the same *global* batch from the seed and keeps its own slice of rows
(:meth:`World.shard`), so N processes see exactly the batches one process would. Losses are
sums over the rank's scored positions divided by the global count (then multiplied by the
world size, because DistributedDataParallel averages gradients over ranks): the gradient is
then the one of the global batch's mean loss, as in one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0  # this process's index in the group
    size: int = 1  # number of processes
    local_rank: int = 0  # index on this machine (picks the GPU)
    device: torch.device = torch.device("cpu")  # where this process computes
    backend: str | None = None  # "gloo" or "nccl" when distributed, None for one process

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (rows rank*b ... (rank+1)*b - 1)."""
        if t.shape[0] % self.size:
            raise ValueError(f"batch: the global batch of {t.shape[0]} sequences does not split evenly over {self.size} processes")
        b = t.shape[0] // self.size
        return t[self.rank * b:(self.rank + 1) * b]

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """A near-even share of rows for evaluation (the shares may differ by one row)."""
        n = t.shape[0]
        return t[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return t
        d = t.to(self.device) if self.backend == "nccl" else t  # nccl reduces CUDA tensors only
        dist.all_reduce(d, op=op)
        if d is not t:
            t.copy_(d.to(t.device))
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) over ranks, in place; returns ``t``. A no-op for one process."""
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _env_int(name: str):
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (set by torchrun)") from None


def setup(device: str = "auto", timeout_s: float = 120.0) -> World:
    """The :class:`World` of this process; joins the process group under torchrun.

    Args:
        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
        timeout_s: how long collective operations wait for the other ranks.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local = _env_int("LOCAL_RANK") or 0
    if size == 1:
        return World(device=torch.device("cuda" if use_cuda else "cpu"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return World(rank=rank, size=size, local_rank=local, device=dev, backend=backend)


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        # every rank leaves together: a rank tearing its connections down while another still
        # works (rank 0 draws the plot) was seen to abort in gloo under load
        dist.barrier()
        dist.destroy_process_group()
