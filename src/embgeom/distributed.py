"""Sharding one analysis across the processes that torchrun starts.

Every process reads the same corpus and forms the same sequence of batches; batch i
belongs to rank i mod world, so a batch's forward pass is exactly the one a single
process would run (same windows, same padding, same shape). The outlier threshold
is calibrated on the norms of the first windows of every rank together, each rank
accumulates its own batches, and rank 0 receives the other ranks' `state_dict`s one
at a time and merges them exactly. With one process nothing here touches
torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import EmbgeomError


@dataclass
class Shard:
    """This process's place in the run: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device_hint: str = "auto") -> "Shard":
        """One process, or the rank torchrun (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR)
        says this is; joins the process group (nccl on CUDA, gloo on CPU) if needed."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_available():
            raise EmbgeomError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if not dist.is_initialized():
            use_cuda = (torch.cuda.is_available() and device_hint == "auto") or str(device_hint).startswith("cuda")
            backend = "nccl" if use_cuda else "gloo"
            if use_cuda:
                torch.cuda.set_device(local)
            try:
                dist.init_process_group(backend)
            except (RuntimeError, ValueError) as exc:
                raise EmbgeomError(f"could not join the torchrun process group ({backend}): {exc}") from None
        return cls(dist.get_rank(), dist.get_world_size(), local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this rank computes on: with several ranks, `auto`/`cuda` mean
        this rank's own GPU (cuda:LOCAL_RANK)."""
        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    # Collectives: with one process each is the identity.
    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def fold_to_main(self, obj, fold):
        """fold(acc, obj_r) over every rank's `obj` in rank order, on rank 0, receiving
        one rank's object at a time (so rank 0 never holds all of them at once);
        returns the folded value on rank 0 and None on the others."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        if not self.is_main:
            dist.send_object_list([obj], dst=0)
            return None
        acc = obj
        for src in range(1, self.world):
            box = [None]
            dist.recv_object_list(box, src=src)
            acc = fold(acc, box[0])
        return acc

    def gather_tensors(self, t: torch.Tensor) -> list:
        """All ranks' CPU tensors (any length along their last axis), in rank order."""
        return [torch.as_tensor(x) for x in self.all_gather(t.cpu())]

    def check_all(self, problem: str | None) -> None:
        """Raise on every rank if any rank found a problem (so none waits forever)."""
        problems = [p for p in self.all_gather(problem) if p]
        if problems:
            raise EmbgeomError(problems[0])


def leave_process_group() -> None:
    """End this process's membership of the process group, if it joined one (the
    group outlives single analyses, so that a sweep's analyses share it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
