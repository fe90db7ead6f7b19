"""benchmarks/device_race.sh runs the race with the interpreter it is given, not whatever ``python3`` is on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_race.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("setsid") is None,
                                reason="needs bash and setsid (Linux)")


def _run(tmp_path: Path, env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # PATH without any python3: a bare `python3` in the script would not be found
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "setsid", "nohup", "cat", "cp", "rm", "mkdir", "tail", "sleep", "dirname"):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "CGGR_RACE_STATE": str(tmp_path / "state"), **env_extra}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


def test_uses_the_python_it_is_given(tmp_path):
    # `cggr race --help` exits without writing a JSON: the script then reports FAILED with the race's log (the
    # help text), which shows that the given interpreter ran the race module.
    out = _run(tmp_path, {"PYTHON": sys.executable, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
               "help-check", "60", "--help")
    log = (tmp_path / "state" / "cggr-race-help-check" / "log").read_text()
    assert "usage:" in log and "race" in log, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("FAILED (help-check): no race-help-check.json; see the log above")
    assert out.returncode == 1


def test_a_python_without_torch_is_refused_up_front(tmp_path):
    out = _run(tmp_path, {"PYTHON": str(tmp_path / "no-such-python")}, "bad", "5")
    assert out.returncode == 2
    assert "set PYTHON=" in out.stderr and "no-such-python" in out.stderr
    assert not (tmp_path / "state" / "cggr-race-bad").exists()  # nothing started


def test_no_python3_on_path_and_no_venv_is_a_clear_error(tmp_path):
    out = _run(tmp_path, {}, "none", "5")
    assert out.returncode == 2 and "no Python with torch" in out.stderr
