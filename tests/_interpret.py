"""Helpers for CPU test modules that run Triton kernels in the interpreter (``TRITON_INTERPRET=1``).

The interpreter must be on before triton itself is imported (its standard library is decorated at import). A
module imports its kernels inside :func:`interpreter_env`; when triton was imported already in this process (by
another test module), the kernels are compiled ones and the module's checks run through
:func:`run_in_fresh_process` instead. The variable is restored after the import (torch.compile in other test
modules must not see it: without triton it makes dynamo graph-break) and set again around the module's own
tests by an autouse fixture. :func:`module_hooks` gives a module that fixture, its ``needs_interp`` mark and its
``test_in_fresh_process``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest


@contextlib.contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 while the body imports triton and the kernels (if triton is not imported yet)."""
    before = os.environ.get("TRITON_INTERPRET")
    try:
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def is_interpreted(*kernels) -> bool:
    """Whether every given ``@triton.jit`` kernel is an interpreted one."""
    return all(type(k).__name__ == "InterpretedFunction" for k in kernels)


NO_TRITON = ("needs triton (pip install triton, Linux): without it the Triton kernels are not checked, not even in the "
             "CPU interpreter")


def import_triton():
    """``import triton`` (the caller does it inside :func:`interpreter_env`), or skip the calling module with
    :data:`NO_TRITON` as the reason."""
    return pytest.importorskip("triton", reason=NO_TRITON)


def run_in_fresh_process(test_file: str, markexpr: str = "") -> None:
    """Run ``pytest`` on ``test_file`` in a new interpreter with TRITON_INTERPRET=1 and the parent's marker
    selection (``-m``: the quick set, or ``slow``); fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    select = ["-m", markexpr] if markexpr else []
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *select, test_file],
                       env=env, capture_output=True, text=True, cwd=root, timeout=600)
    # 5: no test of the module matches the selection (e.g. -m slow on a module without slow tests)
    assert r.returncode in (0, 5), r.stdout[-4000:] + r.stderr[-2000:]


def module_hooks(interpreted: bool, test_file: str) -> tuple[pytest.MarkDecorator, Callable, Callable | None]:
    """What every interpreter test module binds at its top, from whether its kernels are interpreted ones.

    Usage (module level): ``needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED,
    __file__)``.

    Returns:
        ``needs_interp``: a skip mark for checks that need interpreted kernels (compiled ones: the checks run in
        the fresh process instead); an autouse fixture that sets TRITON_INTERPRET=1 around each of the module's
        tests when its kernels are interpreted (the dispatch and the tile choice read it at call time); and
        ``test_in_fresh_process``, which runs the module in a new interpreter when its kernels are compiled ones
        (``None`` when they are interpreted: the checks ran in this process, and there is nothing to collect, so
        no skip line either).
    """
    needs_interp = pytest.mark.skipif(
        not interpreted, reason="kernels compiled before TRITON_INTERPRET was set: see test_in_fresh_process"
    )

    @pytest.fixture(autouse=True)
    def interpret_env(monkeypatch):
        if interpreted:
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    def test_in_fresh_process(request):
        run_in_fresh_process(test_file, request.config.getoption("markexpr"))

    return needs_interp, interpret_env, (None if interpreted else test_in_fresh_process)
