"""What running under torchrun (DistributedDataParallel) needs: the process group from
torchrun's environment, who writes files, and agreement between the processes.

ADMM's trap under DDP: every process must take exactly the same allocation, or their
weights drift apart silently. Projections here are deterministic, so every process
computes them, and `check_same` compares a digest of the result across processes after
each one (a mismatch stops the run with a clear error). Control that only one process
receives (a live target, a stop request) is taken from rank 0 by every process.
Run alone, every function here is a no-op.
"""
from __future__ import annotations

import gc
import os
from typing import Callable

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> None:
    """Join the process group torchrun describes: nccl when the processes use CUDA, gloo on
    the CPU. Nothing when the process runs alone or has joined already."""
    if not launched() or dist.is_initialized():
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def leave(finished: bool = True) -> None:
    """Leave the process group while Python is whole (gloo may abort at interpreter exit). After
    a command every process finished, wait for all first, so none tears gloo down while a peer
    still sends; after a failure a peer may be gone, so do not wait for it."""
    if not dist.is_initialized():
        return
    gc.collect()  # a DDP model holds the process group: free it first
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and talks to people (rank 0, or the only one)."""
    return rank() == 0


def local_device(name: str) -> str:
    """The device name of this process: under torchrun on CUDA, its own GPU (LOCAL_RANK)."""
    if active() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return name


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_main(value: float) -> float:
    """Rank 0's value, on every process."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.broadcast(t, 0)
    return float(t.item())


def check_same(digest: torch.Tensor, what: str) -> None:
    """Stop with a clear error unless every process holds the same `digest` (a float64 vector)."""
    if not active():
        return
    d = digest.detach().to(device=_device(), dtype=torch.float64).flatten()
    low, high = d.clone(), d.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"the processes of this distributed run disagree on the {what} (rank {rank()} of {world_size()}): "
            "their weights would drift apart; make sure every process runs the same code, data and seed"
        )


class ProcessGroup:
    """What a Compressor's processes agree on under torchrun (`compressor.OneProcess` alone):
    every step every process takes rank 0's target (a slider moves only rank 0's), and after a
    projection their allocations must be the same."""

    def target(self, bits: float) -> float:
        return from_main(bits)

    def check(self, fingerprint: Callable[[], torch.Tensor]) -> None:
        check_same(fingerprint(), "allocation after the projection")
