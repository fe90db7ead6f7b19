"""The README's distributed recipes run as written: each torchrun line of its "Distributed training" section
launches 2 processes (gloo on CPU here) that train, check that their replicas are identical and print so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    section = README.split("### 9. Distributed training", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_section_has_one_command_per_engine():
    assert [re.search(r"--engine (\w+)", c).group(1) for c in _commands()] == ["ddp", "fsdp2", "accelerate"]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: re.search(r"--engine (\w+)", c).group(1))
def test_readme_distributed_command_runs(command):
    pytest.importorskip("transformers")
    if "accelerate" in command:
        pytest.importorskip("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU and gloo, as CI runs it
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # torchrun beside python
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("step 3: loss ") for line in lines), proc.stdout
    assert lines[-1].startswith("done: ") and lines[-1].endswith("replicas identical"), proc.stdout
