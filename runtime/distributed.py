"""distributed: data parallel over torch.distributed, with the optimizer state sharded over the ranks' hosts.

Every rank runs the same plan on its own rows of the batch. A group's flat buffers are cut into `ranks` equal
shards (the group padded to a multiple of ranks x 16 elements); each rank's host holds and updates only its
shard of the fp32 master, the Adam moments and the stream copy (ZeRO-1 over host memory). A copy-in moves only
this rank's shard over PCIe and all-gathers the rest GPU to GPU; a copy-out reduce-scatters the gradient on the
device first, so PCIe bytes per GPU fall as 1/ranks. Resident groups are whole on every device and their
gradients are all-reduced. Device collectives go over the default process group (NCCL on GPUs, gloo on CPUs);
host ones (the initial weights, checkpoints) over a gloo group, so that fp32 state never visits the GPU.

Collectives are issued in plan order on every rank, which is the same order everywhere: the plan is.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .store import ALIGN

# torch 2.13 renames the tensor collectives; 2.11 (the GPU machines) has only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for every process: with them, init_process_group needs nothing else."""


def launched() -> bool:
    """Whether this process is one of several that torchrun (or another launcher) started."""
    return all(v in os.environ for v in LAUNCHER_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def process_group(device_type: str) -> None:
    """Make the process group the launcher's variables describe, unless there is one: NCCL for GPUs, gloo for
    the CPU. A long timeout: the first step compiles kernels, and a checkpoint save holds the others waiting."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))


class DataParallel:
    """This process's place among the data-parallel ranks, and the collectives the store and the engine use."""

    def __init__(self, device: torch.device):
        process_group(device.type)
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()
        self.device = device
        backend = dist.get_backend()
        # Host collectives move fp32 state between the ranks' hosts: over gloo, never through the device.
        self.host_group = dist.new_group(backend="gloo") if backend != "gloo" else None
        # The weights' all-gathers on a communicator (so, with NCCL, a stream) of their own: on the default one they
        # would queue behind the gradients' reduce-scatters, which wait for the backward, and hold the prefetches.
        self.gather_group = dist.new_group(backend=backend)
        self.average = dist.ReduceOp.AVG if backend == "nccl" else None
        """NCCL averages as it sums (no fp16 overflow of a sum whose mean fits); gloo sums, then we divide."""
        self.local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", self.ranks))
        """Ranks on this host: they share its cores and its RAM."""

    # -- layout -------------------------------------------------------------------------------------
    def padded(self, numel: int) -> int:
        """A group's length once padded so that every shard has the same length, a multiple of ALIGN."""
        unit = self.ranks * ALIGN
        return -(-numel // unit) * unit

    def shard(self, numel: int) -> tuple[int, int]:
        """[start, end) of this rank's shard of a group of `numel` (already padded) elements."""
        size = numel // self.ranks
        return self.rank * size, (self.rank + 1) * size

    # -- device collectives (on the stream that is current; they wait for its work, and it for theirs) -------
    def gather(self, full: torch.Tensor) -> None:
        """`full` holds this rank's shard in place; fill in the others' (in place: NCCL's all-gather allows it)."""
        start, end = self.shard(full.numel())
        self._wait(_all_gather(full, full[start:end], group=self.gather_group, async_op=True))

    def reduce_scatter(self, full: torch.Tensor) -> torch.Tensor:
        """Average `full` over the ranks into this rank's shard of it, which is returned (a view of `full`)."""
        start, end = self.shard(full.numel())
        shard = full[start:end]
        # The mean of the ranks' gradients: the gradient of the combined batch.
        self._wait(_reduce_scatter(shard, full, op=self.average or dist.ReduceOp.SUM, async_op=True))
        return shard if self.average else shard.div_(self.ranks)

    def all_reduce(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        op = self.average if average and self.average else dist.ReduceOp.SUM
        self._wait(dist.all_reduce(tensor, op=op, async_op=True))
        return tensor.div_(self.ranks) if average and not self.average else tensor

    @staticmethod
    def _wait(work) -> None:
        work.wait()  # on a GPU: the current stream waits for the collective's stream (no host wait)

    # -- host collectives (blocking; fp32 state on the CPU) ----------------------------------------------
    def scatter(self, shard: torch.Tensor, full: torch.Tensor | None) -> None:
        """Rank 0's `full` group, cut into shards, one to each rank's `shard`."""
        pieces = list(full.chunk(self.ranks)) if self.rank == 0 else None
        dist.scatter(shard, pieces, src=0, group=self.host_group)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` to every rank (host memory)."""
        dist.broadcast(tensor, src=0, group=self.host_group)

    def gather_to_first(self, shard: torch.Tensor) -> torch.Tensor | None:
        """Every rank's shard, concatenated on rank 0 (None elsewhere)."""
        full = torch.empty(shard.numel() * self.ranks, dtype=shard.dtype) if self.rank == 0 else None
        dist.gather(shard, list(full.chunk(self.ranks)) if full is not None else None, dst=0, group=self.host_group)
        return full

    def host_all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        full = torch.empty(shard.numel() * self.ranks, dtype=shard.dtype)
        dist.all_gather(list(full.chunk(self.ranks)), shard, group=self.host_group)
        return full

    def smallest(self, value: int) -> int:
        """The smallest of every rank's `value` (host budgets: every rank must plan alike)."""
        return -self.largest(-value)

    def same_everywhere(self, value: str, what: str) -> None:
        """Raise unless every rank has the same `value`: a different plan would pair unlike collectives."""
        values = [None] * self.ranks
        dist.all_gather_object(values, value, group=self.host_group)
        differ = [rank for rank, v in enumerate(values) if v != values[0]]
        if differ:
            raise RuntimeError(f"ranks {differ} have another {what} than rank 0; every rank must compile the same "
                               f"model with the same example shapes, gpu_mem and options")

    def mean(self, value: float) -> float:
        """The ranks' mean of a number (a loss to report)."""
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, group=self.host_group)
        return float(tensor) / self.ranks

    def largest(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(tensor)

    def barrier(self) -> None:
        dist.barrier(group=self.host_group)
