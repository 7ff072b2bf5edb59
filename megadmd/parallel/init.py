"""Process start-up: one entry point under ``deepspeed``, ``torchrun`` or a plain single process.

- ``deepspeed`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT and appends ``--local_rank``.
- ``torchrun`` sets the same environment variables only.
- A plain ``megadmd`` process has none of them; it becomes rank 0 of a world of 1.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class ProcessInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", local_rank: int | None = None) -> ProcessInfo:
    """Initialize torch.distributed through DeepSpeed (idempotent)."""
    import deepspeed
    import torch.distributed as dist

    if local_rank is not None and local_rank >= 0:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if "RANK" not in os.environ:  # a plain single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # DeepSpeed's CPU path would JIT-compile a shared-memory comm op (30-40 s on first use);
        # we skip it and use gloo directly: CPU runs are for tests and demos, not for speed.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return ProcessInfo(rank=dist.get_rank(), local_rank=local, world_size=dist.get_world_size(),
                       device=device)


def shutdown_distributed() -> None:
    """End a command's process group in step on every rank (the CLI calls this last). A rank that
    exits while another still talks to it can abort in the C++ runtime, and PyTorch warns when a
    process exits with its group alive."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under nccl (which has no
    CPU path), the CPU under gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
