"""tests/test_distributed.py's checks over NCCL on 2 GPUs (rank r on cuda:r), fp32, and the README's distributed
recipes with ``--backend nccl``. Needs 2 CUDA devices (skipped otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests._distributed import run_processes
from tests.test_distributed import _fsdp2_body, _global_selection_body
from tests.test_readme_distributed import _commands

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[2]
TOL = 2e-4  # fp32 on GPU: the reference runs one batch of W·k rows, the ranks k rows each (other GEMM shapes)


def _needs_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")


def _global_selection_worker(rank, world):
    _global_selection_body(rank, world, torch.device("cuda", rank), torch.float32, TOL)


def _fsdp2_worker(rank, world):
    _fsdp2_body(rank, world, torch.device("cuda", rank), torch.float32, TOL)


def test_global_selection_over_ddp_nccl_equals_one_process():
    _needs_two_gpus()
    run_processes(_global_selection_worker, backend="nccl")


def test_fsdp2_nccl_matches_the_unsharded_model():
    _needs_two_gpus()
    run_processes(_fsdp2_worker, backend="nccl")


@pytest.mark.parametrize("command", _commands(), ids=lambda c: re.search(r"--engine (\w+)", c).group(1))
def test_readme_distributed_command_runs_over_nccl(command):
    _needs_two_gpus()
    if "accelerate" in command:
        pytest.importorskip("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(command + " --backend nccl", shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    engine = re.search(r"--engine (\w+)", command).group(1)
    assert proc.stdout.splitlines()[-1] == f"done: {engine} on 2 processes (nccl), replicas identical", proc.stdout
