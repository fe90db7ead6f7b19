"""Run a test body in several processes joined by a process group (``torch.multiprocessing.spawn``).

The body is a module-level function ``fn(rank, world_size, *args)`` (spawned processes import it by name). A
failure in any process fails the test with that process's traceback; a collective that never completes fails
after ``timeout_s`` instead of hanging the suite. ``gloo`` runs on CPU; ``nccl`` gives rank r the GPU ``cuda:r``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, backend: str, store: str, timeout_s: float,
           args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    kw: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kw["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kw)
    fn(rank, world_size, *args)  # on an error the process exits and spawn reports it (no collective teardown)
    dist.barrier()  # every rank done with its collectives before any tears the group down
    dist.destroy_process_group()


def run_processes(fn: Callable[..., Any], *args: Any, backend: str = "gloo", world_size: int = 2,
                  timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes with a ``backend`` process group."""
    import pytest

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if backend == "gloo" and not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available")
    if backend == "nccl" and (not dist.is_nccl_available() or torch.cuda.device_count() < world_size):
        pytest.skip(f"needs NCCL and {world_size} GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world_size, backend, os.path.join(tmp, "store"), timeout_s, args),
                 nprocs=world_size)


def run_gloo(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes with a gloo process group."""
    run_processes(fn, *args, backend="gloo", world_size=world_size, timeout_s=timeout_s)
