"""Distributed data parallel training under torchrun: one process per device, gloo on CPU, nccl on CUDA.

    torchrun --standalone --nproc_per_node=2 -m training.train --out artifacts/ddp          # one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST0:29400 --rdzv_id=job1 -m training.train --out artifacts/ddp   # on every node

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or with a world of one) training runs in one process
as before. --batch-size is per process (the global batch is world size x batch size). Every rank builds the same
deterministic splits (checked by fingerprint); only rank 0 prints and writes the output directory. When one rank
fails, torchrun stops the others.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def start(device: str) -> None:
    """Join torchrun's process group when launched by it with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> torch.device:
    """This process's device: under torchrun on CUDA, the GPU of its local rank."""
    d = torch.device(device)
    if d.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return d


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_same(what: str, value: Any) -> None:
    """Fail on every rank, naming the ranks, when `value` differs between them (e.g. the data each node sees)."""
    if world_size() == 1:
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise ValueError(f"{what} differs between ranks: rank 0 has {values[0]!r:.80}, ranks {differ} have "
                         f"{values[differ[0]]!r:.80}; every node must read the same data (same --data-dir "
                         "contents, same split options)")


def shard(dataset: Dataset) -> Dataset:
    """This rank's share of an evaluation set: every rank-th item, no padding, so the shares add up exactly."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))  # type: ignore[arg-type]


def total(*counts: float) -> list[float]:
    """Sums over all ranks."""
    if world_size() == 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.float64,
                     device=torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers. DDP syncs them at the start of each forward, so after the last step each
    rank's batch-norm statistics still hold its own batch; evaluation must see one model."""
    if world_size() == 1:
        return
    for b in model.buffers():
        dist.broadcast(b, 0)
