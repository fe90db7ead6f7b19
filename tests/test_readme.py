"""Every Python example in the README runs, and CI runs exactly the README's test command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


# transformers' Trainer pins its data loader's memory by default (right on a GPU, which the README's Trainer example
# is for); on a CPU-only machine torch says that nothing gets pinned
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator:UserWarning")
def test_readme_python_examples_run_in_order():
    pytest.importorskip("transformers")
    blocks = _blocks("python")
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks):
        if "from peft import" in code and importlib.util.find_spec("peft") is None:
            continue  # the LoRA / PEFT recipe needs peft (the test extra installs it); nothing later uses it
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # re-raise with the block's text, so a failure says which example broke
            raise AssertionError(f"README python block {i} failed:\n{code}") from exc


def test_ci_runs_the_readme_test_command():
    test_commands = [b.strip() for b in _blocks("bash") if "pytest" in b]
    assert len(test_commands) == 1, test_commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_commands[0] in ci.splitlines()


def test_the_readme_test_command_runs_every_test():
    """The quick set (pyproject's addopts deselect the tests marked slow) and then the slow set: together, all."""
    import shlex

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    default = shlex.split(opts["addopts"])
    default_m = default[default.index("-m") + 1] if "-m" in default else None
    command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    selections = []
    for part in command.split("&&"):
        words = shlex.split(part)
        if "pytest" in words:
            args = words[words.index("pytest") + 1:]  # `python3 -m pytest`: the -m before it is Python's
            selections.append(args[args.index("-m") + 1] if "-m" in args else default_m)
    assert default_m == "not slow" and sorted(selections) == ["not slow", "slow"], selections
