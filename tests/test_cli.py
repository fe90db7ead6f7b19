"""The ``cggr`` command line: help, one-line errors, info, bench, the LR schedule and the report."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest

from cggr.cli.main import main
from cggr.cli.race import lr_at
from cggr.cli.report import summary_rows

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "config.json"
    transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ).to_json_file(path)
    return path


@pytest.mark.parametrize("argv", [[], ["info"], ["bench"], ["race"]])
def test_help_of_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cggr")
    if argv == ["race"]:
        for option in ("--model", "--data", "--minutes", "--ratio", "--router-layers", "--arms", "--device",
                       "--seed", "--out", "--scan-multiplier"):
            assert option in out


def _error(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse type errors exit from inside parse_args
        code = exc.code
    assert code == 2, argv
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("cggr race: error:"), err
    return err


def test_bad_arguments_exit_with_one_line(tmp_path, capsys):
    assert "unknown preset 'gpt-17'" in _error(["race", "--model", "gpt-17"], capsys)
    assert "does not exist" in _error(["race", "--model", str(tmp_path / "nope" / "config.json")], capsys)
    assert "does not exist" in _error(["race", "--data", str(tmp_path / "missing.txt")], capsys)
    assert "ratio must be in (0, 1]" in _error(["race", "--ratio", "0"], capsys)
    assert "ratio must be in (0, 1]" in _error(["race", "--ratio", "1.5"], capsys)
    assert "--minutes must be > 0" in _error(["race", "--minutes", "-1"], capsys)
    assert "--minutes must be > 0" in _error(["race", "--minutes", "0"], capsys)
    assert "unknown arm(s) fast" in _error(["race", "--arms", "standard,fast"], capsys)
    assert "--scoring must be one of entropy, margin, loss, combined, got 'hard'" in _error(
        ["race", "--scoring", "hard"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    assert "corpus is empty" in _error(["race", "--data", str(empty), "--minutes", "0.01"], capsys)


def test_console_script_error_has_no_traceback():
    exe = [sys.executable, "-c", "import sys; from cggr.cli.main import main; sys.exit(main())"]
    proc = subprocess.run([*exe, "race", "--model", "no-such-preset"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown preset" in proc.stderr


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("cggr", "torch", "device", "kernels used", "attention"):
        assert key in out


def test_bench_times_every_arm_against_standard(small_config, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(small_config), "--shapes", "4x16,8x16", "--warmup", "1", "--iters", "2",
                 "--router-layers", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    arms = ("standard", "cggr", "cggr-loss", "random")
    assert [(r["B"], r["arm"]) for r in rows] == [(b, a) for b in (4, 8) for a in arms]
    for r in rows:
        assert r["status"] == "ok" and r["step ms"] > 0
        assert r["samples/s"] == pytest.approx(r["B"] / (r["step ms"] / 1e3), rel=1e-3)
        standard = next(s for s in rows if s["B"] == r["B"] and s["arm"] == "standard")
        assert r["speed-up"] == pytest.approx(standard["step ms"] / r["step ms"], rel=1e-2)
    assert data["environment"]["torch"] and "cggr bench" in (out / "bench.md").read_text()
    assert "speed-up" in capsys.readouterr().out
    assert "BxT pairs" in _bench_error(["bench", "--shapes", "4by512"], capsys)


def _bench_error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_budget_aware_lr_schedule():
    peak = 3e-3
    assert lr_at(0.0, peak) == 0.0
    assert lr_at(0.025, peak) == pytest.approx(peak / 2)  # linear warm-up over the first 5%
    assert lr_at(0.05, peak) == pytest.approx(peak)
    assert lr_at(0.525, peak) == pytest.approx(peak / 2)  # cosine midpoint
    assert lr_at(1.0, peak) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(1.7, peak) == pytest.approx(0.0, abs=1e-15)  # the step that crosses the budget
    values = [lr_at(f / 100, peak) for f in range(5, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_summary_rows_differences_to_standard():
    arms = [
        {"arm": "standard", "steps": 10, "sequences_scanned": 80, "tokens_scanned": 800, "tokens_backpropagated": 800,
         "tokens_in_loss": 800, "train_seconds": 1.0, "heldout_loss": 4.0, "accuracy": 0.10},
        {"arm": "cggr", "steps": 8, "sequences_scanned": 256, "tokens_scanned": 2560, "tokens_backpropagated": 640,
         "tokens_in_loss": 640, "train_seconds": 1.0, "heldout_loss": 3.8, "accuracy": 0.125},
    ]
    rows = summary_rows(arms)
    assert rows[0]["Δ loss"] == "–" and rows[1]["Δ loss"] == "-0.2000 (-5.0%)"
    assert rows[1]["Δ acc"] == "+2.5 pt" and rows[1]["accuracy"] == "12.5%"
    assert math.isclose(rows[1]["held-out loss"], 3.8)


def test_contention_warnings():
    from cggr.cli.report import stall_warnings

    calm = {"arm": "standard", "median_step_seconds": 0.13, "max_step_seconds": 0.2, "cpu_utilisation": 0.93}
    stalled = {"arm": "cggr", "median_step_seconds": 0.13, "max_step_seconds": 4.5, "cpu_utilisation": 0.9}
    starved = {"arm": "random", "median_step_seconds": 3.0, "max_step_seconds": 3.2, "cpu_utilisation": 0.45}
    warnings = stall_warnings([calm, stalled, starved])
    assert len(warnings) == 2
    assert warnings[0].startswith("cggr: slowest step 4.50 s") and warnings[1].startswith("random: the process got 45%")
    assert stall_warnings([starved], device="cuda:0") == []  # CPU share is only meaningful for CPU runs
