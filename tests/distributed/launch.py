"""Run a check on W processes joined by a gloo process group on CPU (torch.multiprocessing spawn); an assertion
failing on any rank fails the test with that rank's traceback."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` fresh processes with the default group initialised."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
