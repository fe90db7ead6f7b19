"""The ``cggr`` command line: help, one-line errors, info, bench, the LR schedule and the report."""

from __future__ import annotations

import itertools
import json
import math
import re
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
    from cggr.cli.race import ARM_SPECS

    arms = tuple(n for n, a in ARM_SPECS.items() if not a.data_seed_offset)  # every arm but the A/A one
    assert arms[:4] == ("standard", "cggr", "cggr-loss", "random") and "cggr-reducible" in arms
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
    def row(arm, seed, loss, acc=None):
        return {"arm": arm, "seed": seed, "steps": 10, "sequences_scanned": 80, "tokens_scanned": 800,
                "tokens_backpropagated": 800, "tokens_in_loss": 800, "train_seconds": 1.0, "heldout_loss": loss,
                "heldout_se": 0.01, "accuracy": acc}

    one = summary_rows([row("standard", 0, 4.0, 0.10), row("cggr", 0, 3.8, 0.125)])
    assert one[0]["Δ vs standard"] == "–" and one[1]["Δ vs standard"] == "-0.2000"  # one seed: no interval
    assert one[1]["accuracy"] == "12.5%" and one[1]["held-out loss"] == "3.8000 ± 0.0100 SE"
    # three seeds: paired differences -0.2, -0.15, -0.25 -> mean -0.2, sd 0.05, t(0.975, 2) = 4.3027
    std = [4.0, 4.2, 3.9]
    rows = summary_rows([row("standard", s, x) for s, x in enumerate(std)]
                        + [row("cggr", s, x + d) for s, (x, d) in enumerate(zip(std, (-0.2, -0.15, -0.25)))])
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert rows[1]["Δ vs standard"] == f"{-0.2:+.4f} [{-0.2 - half:+.4f}, {-0.2 + half:+.4f}]"
    rows = summary_rows([row("standard", s, x) for s, x in enumerate(std)]
                        + [row("random", s, x + d) for s, (x, d) in enumerate(zip(std, (-0.2, 0.1, 0.05)))])
    assert rows[1]["Δ vs standard"].endswith(" tie")  # the interval contains 0


def test_summary_counts_print_as_counts_and_losses_keep_4_decimals():
    """Steps, sequences and backprop tokens are means over seeds: the count when the seeds agree, else one decimal
    (was 51.3000, and 80,000 for 80,000.5: the 4-decimal float format, and whole numbers from 100 on); losses keep
    4 decimals. The same cells in the terminal table and the Markdown, and on the plot's legend."""
    from cggr.cli.plot import race_figure
    from cggr.cli.tables import cell, count_over_seeds, markdown_table, text_table

    def row(arm, seed, steps, seqs, train_loss, held):
        curve = [{"fraction": f, "time_s": 3.0 * f, "heldout_loss": held + 1 - f} for f in (0.0, 1.0)]
        return {"arm": arm, "seed": seed, "steps": steps, "sequences_scanned": seqs, "tokens_scanned": 32 * seqs,
                "tokens_backpropagated": 1_234_567, "tokens_in_loss": 1_234_567, "train_seconds": 3.0,
                "heldout_loss": held, "last_train_loss": train_loss, "curve": curve}

    arms = [row("standard", 0, 51, 80_000, 4.25, 4.0), row("standard", 1, 52, 80_001, 4.5, 4.5),
            row("standard", 2, 51, 80_000, 4.5, 4.25),
            row("cggr", 0, 10, 640, 3.0, 3.9), row("cggr", 1, 10, 640, 3.5, 4.4), row("cggr", 2, 10, 640, 3.75, 4.15)]
    std, cggr = summary_rows(arms)
    assert (std["steps"], std["sequences"], std["backprop tok"]) == ("51.3", "80,000.3", 1_234_567)
    assert (cggr["steps"], cggr["sequences"], cggr["backprop tok"]) == (10, 640, 1_234_567)
    assert [cell(std[k]) for k in ("steps", "sequences", "backprop tok")] == ["51.3", "80,000.3", "1,234,567"]
    assert cell(cggr["steps"]) == "10" and cell(std["train loss"]) == "4.4167"  # (4.25 + 4.5 + 4.5) / 3
    assert std["held-out loss"].startswith("4.2500 ± ")
    for table in (text_table([std, cggr]), markdown_table([std, cggr])):
        cells = re.split(r"[\s|]+", table)
        assert {"51.3", "80,000.3", "1,234,567", "10", "640", "4.4167", "3.4167"} <= set(cells), table
        assert "51.3000" not in table and "80,000.0" not in table
    assert count_over_seeds([]) is None and count_over_seeds([7]) == 7 and count_over_seeds([1, 2]) == "1.5"
    assert count_over_seeds([999, 1000]) == "999.5" and count_over_seeds([2.0, 2.0]) == 2
    assert count_over_seeds([752, 754]) == 753 and count_over_seeds([96_190, 96_194]) == 96_192  # whole means

    payload = {"settings": {"model": "m", "data": "d", "minutes_per_arm": 0.05, "ratio": 0.25,
                            "scan_multiplier": 4.0},
               "environment": {"device": "cpu"}, "arms": arms}
    legend = [t.get_text() for t in race_figure(payload).axes[0].get_legend().get_texts()]
    assert legend[:2] == ["standard (51.3 steps, mean of 3 seeds)", "cggr (10 steps, mean of 3 seeds)"]


def test_time_to_target_reads_the_ladder():
    from cggr.cli.report import time_to_target

    row = {"curve": [{"heldout_loss": 8.0}, {"heldout_loss": 6.5}], "train_seconds": 40.0, "probe_loss": 5.0,
           "ladder": [{"budget_s": 10.0, "heldout_loss": 6.0}, {"budget_s": 20.0, "heldout_loss": 5.4},
                      {"budget_s": 30.0, "heldout_loss": 5.1}]}
    assert time_to_target(row, 5.7) == pytest.approx(15.0)  # halfway between the 10 s and 20 s rungs
    assert time_to_target(row, 5.05) == pytest.approx(35.0)
    assert time_to_target(row, 5.0) == pytest.approx(40.0)
    assert time_to_target(row, 4.9) is None  # not reached within the budget
    assert time_to_target(row, 9.0) == 0.0


def test_header_names_the_precision_the_race_ran_in():
    from cggr.cli.report import head_line

    assert "fp32" in head_line({"head": "logits", "device": "cpu", "dtype": "auto"})
    assert "bf16" not in head_line({"head": "logits", "device": "cpu", "dtype": "auto"})
    assert "bf16 under autocast" in head_line({"head": "logits", "device": "cuda:0", "dtype": "auto"})
    assert "bf16" in head_line({"head": "fused", "precision": "bf16 autocast"})
    assert head_line({"head": "logits", "precision": "fp32"}).endswith("(fp32, loss in fp32)")


def test_demo_note():
    from cggr.cli.race import demo_note

    assert "demo-sized race" in demo_note("tiny", 1) and "--seeds 3" in demo_note("tiny", 1)
    assert "demo-sized" in demo_note("tiny", 3) and "seed" not in demo_note("tiny", 3).split(":", 1)[1][-40:]
    assert demo_note("smollm-135m", 3) == ""


def test_contention_warnings():
    from cggr.cli.report import stall_warnings

    calm = {"arm": "standard", "median_step_seconds": 0.13, "max_step_seconds": 0.2, "cpu_utilisation": 0.93}
    stalled = {"arm": "cggr", "median_step_seconds": 0.13, "max_step_seconds": 4.5, "cpu_utilisation": 0.9}
    starved = {"arm": "random", "median_step_seconds": 3.0, "max_step_seconds": 3.2, "cpu_utilisation": 0.45}
    warnings = stall_warnings([calm, stalled, starved])
    assert len(warnings) == 2
    assert warnings[0].startswith("cggr: slowest step 4.50 s") and warnings[1].startswith("random: the process got 45%")
    assert stall_warnings([starved], device="cuda:0") == []  # CPU share is only meaningful for CPU runs


def test_time_fn_times_each_call_once_on_a_fake_clock():
    """time_fn on the CPU: exactly warmup + iters calls, one sample per timed call (read off a fake clock that
    each call advances by a known amount), the median of those. torch.utils.benchmark.Timer, by contrast, runs
    extra warm-up calls inside every measurement (the docstring's reason for keeping time_fn for training steps)."""
    from torch.utils.benchmark import Timer

    from cggr.cli.timing import time_fn

    now, calls = [0.0], []
    costs = [0.5, 0.25, 0.004, 0.002, 0.003, 0.010, 0.001]  # two warm-up calls, then five timed ones

    def step():
        now[0] += costs[len(calls)]
        calls.append(1)

    t = time_fn(step, warmup=2, iters=5, device="cpu", clock=lambda: now[0])
    assert len(calls) == 7 and t.warmup == 2 and t.peak_mem_bytes == 0
    assert t.times_ms == pytest.approx([4.0, 2.0, 3.0, 10.0, 1.0])
    assert t.median_ms == pytest.approx(3.0) and t.min_ms == pytest.approx(1.0)
    counted = []
    Timer(stmt="f()", globals={"f": lambda: counted.append(1)}).timeit(1)
    assert len(counted) > 1  # one "timed call" of Timer ran the statement more than once
