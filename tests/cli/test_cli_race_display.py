"""``cggr race`` as a user sees it: setup phases, progress (arm x of N, seed i of S, time left, status during
evaluations), over-budget warnings and plot marks, Ctrl-C, the report's rounding and tables, the plot's titles,
``cggr --version`` / ``python -m cggr``, and ``--router-layers`` refused before any data loads. Every race here runs
on a fake clock (tests/fake_clock.py): the times, step counts and time-left figures are exact."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cggr.cli.main import main  # noqa: E402
from cggr.cli.race import RaceConfig, RaceProgress, format_duration, run_race  # noqa: E402
from cggr.cli.race import run as race_run  # noqa: E402
from cggr.cli.race import train as race_train  # noqa: E402
from tests import fake_clock  # noqa: E402

pytestmark = pytest.mark.usefixtures("race_cache")  # tests/cli/conftest.py: a cache of its own


def _config(small_config, corpus, tmp_path, **overrides) -> RaceConfig:
    settings = dict(model=str(small_config), data=corpus, router_layers=1, batch_size=2, seq_len=32, evals=2,
                    eval_sequences=4, heldout_blocks=8, out=str(tmp_path), progress=False, device="cpu", ladder=())
    settings.update(overrides)
    return RaceConfig(**settings)


# ------------------------------------------------------------------------------------------ progress, unit
def test_time_left_from_a_fake_clock():
    """Before any run has finished: at least (runs left) × (budget + ladder decay time); after: (runs left) × the
    finished runs' mean wall time, less what the current run has spent (never less than its untrained budget)."""
    now = [0.0]
    lines = []
    p = RaceProgress(seeds=2, arms=3, budget=10.0, ladder_seconds=3.0, bars=False, log=lines.append,
                     clock=lambda: now[0])
    assert p.seconds_left() == (78.0, True)  # 6 runs × 13 s, a lower bound
    p.start_arm(0, 0, "standard", 0)
    assert lines[-1] == ("seed 1 of 2 (seed 0) · arm 1 of 3: standard, 10 s of training · at least 1 min 18 s "
                         "left in the race")
    now[0] = 5.0
    p.trained(4.0, 4, 5.5)
    assert p.seconds_left() == (8.0 + 5 * 13.0, True)  # max(13 - 5 spent, 10 - 4 untrained) + 5 runs
    now[0] = 20.0
    assert p.end_arm() == 20.0
    assert p.seconds_left() == (100.0, False)  # 5 runs × 20 s
    p.start_arm(0, 1, "cggr", 0)
    now[0] = 24.0
    p.trained(8.0, 8, 5.0)
    assert p.seconds_left() == (16.0 + 4 * 20.0, False)  # max(20 - 4, 10 - 8) + 4 runs
    p.status("evaluating 4 probe blocks (clock stopped)")
    assert p.status_text.startswith("evaluating") and p.left_text() == "about 1 min 36 s left in the race"
    now[0] = 45.0
    p.end_arm()
    p.start_arm(1, 2, "random", 1)
    assert lines[-1].startswith("seed 2 of 2 (seed 1) · arm 3 of 3: random") and "about 1 min 30 s" in lines[-1]
    assert [format_duration(s) for s in (0.4, 59.6, 61, 3599, 3725)] == ["0 s", "1 min 00 s", "1 min 01 s",
                                                                           "59 min 59 s", "1 h 02 min"]


def test_phase_steps_are_logged_at_each_quarter_without_a_bar():
    lines = []
    p = RaceProgress(seeds=1, arms=1, budget=1.0, bars=False, log=lines.append, clock=lambda: 0.0)
    with p.phase("reference model", "200 steps"):
        for i in range(1, 201):
            p.phase_step(i, 200)
        assert p.status_text == "setup: reference model: step 200 of 200"
    assert lines[1:4] == [f"setup: reference model: step {i} of 200" for i in (50, 100, 150)]
    assert lines[4] == "setup: reference model: done in 0 s" and len(lines) == 5


def test_the_reference_model_reports_each_step():
    import torch

    from cggr.cli.reference_model import train_reference

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=31, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16))
    ids = torch.randint(0, 31, (6, 9))
    seen = []
    info = train_reference(model, ids, torch.ones_like(ids, dtype=torch.bool), steps=3, batch_size=2, lr=1e-3,
                           device=torch.device("cpu"), seed=0, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and info["steps"] == 3


def test_setup_phases_are_announced_before_they_run_and_timed():
    now = [0.0]
    lines = []
    p = RaceProgress(seeds=1, arms=1, budget=1.0, bars=False, log=lines.append, clock=lambda: now[0])
    with p.phase("data", "reading x"):
        assert lines == ["setup: data: reading x …"]  # said before the work, not after it
        now[0] = 61.0
    assert lines[-1] == "setup: data: done in 1 min 01 s"


def test_the_ticker_redraws_while_the_main_thread_is_busy():
    """The bar's redraws come from a thread: they go on while the main thread evaluates (no training updates)."""
    import threading

    from cggr.cli.race.progress import _Ticker

    done, calls = threading.Event(), []

    def redraw():
        calls.append(1)
        if len(calls) == 3:
            done.set()

    ticker = _Ticker(redraw, 0.001)
    assert done.wait(timeout=60)  # three redraws without the main thread doing anything
    ticker.stop()
    n = len(calls)
    assert not ticker._thread.is_alive() and len(calls) == n  # stopped: no redraw after stop()


# --------------------------------------------------------------------------------- a race's display, whole
def test_a_race_shows_setup_phases_arm_and_seed_counts_time_left_and_evaluations(small_config, corpus, tmp_path,
                                                                                    monkeypatch, capsys):
    """Steps cost 1 s of a fake clock and the budget is 12 s: the
    time left at the start of runs 1-4 is at least 53 s (4 × (12 s + the ladder rung's 1.2 s decay)), then each
    run takes 15 s (2 warm-up, 12 timed and 1 ladder step): 45, 30 and 15 s. Every phase of setup is
    logged before it runs (the first line comes before the data load); during every evaluation the display says
    so (it does not sit at the last training status); the tables print losses with 4 decimals, the same in the
    terminal and the Markdown."""
    lines: list[str] = []
    events: list[tuple[str, str]] = []
    real_load, real_status = race_run.load_text_data, RaceProgress.status
    real_probe, real_full = race_train.probe_eval, race_train.full_eval

    def load(*args, **kwargs):
        events.append(("load", f"{len(lines)} lines before"))
        return real_load(*args, **kwargs)

    def status(self, text):
        events.append(("status", text))
        return real_status(self, text)

    def probe(*args, **kwargs):
        events.append(("eval", "probe"))
        return real_probe(*args, **kwargs)

    def full(*args, **kwargs):
        events.append(("eval", "full"))
        return real_full(*args, **kwargs)

    monkeypatch.setattr(race_run, "load_text_data", load)
    monkeypatch.setattr(RaceProgress, "status", status)
    monkeypatch.setattr(race_train, "probe_eval", probe)
    monkeypatch.setattr(race_train, "full_eval", full)
    clock = fake_clock.install(monkeypatch, [1.0])
    cfg = _config(small_config, corpus, tmp_path, minutes=0.2, arms=("standard", "random"), seeds=2, evals=2,
                  ladder=(0.5,), reference=True, reference_steps=2, reference_fraction=0.4, reference_blocks=40,
                  progress=True)
    payload = run_race(cfg, log=lines.append, clock=clock)

    assert events[0] == ("load", "1 lines before")  # the data phase was announced before the data loaded
    setup = [line for line in lines if line.startswith("setup: ") and ": step " not in line]
    assert len(setup) == 6
    # the reference's steps (2 here), logged at each quarter when there is no bar to show them in
    assert [line for line in lines if ": step " in line] == ["setup: reference model: step 1 of 2"]
    assert setup[0].startswith("setup: data: reading " + corpus) and "BPE tokenizer" in setup[0]
    assert setup[1] == "setup: data: done in 0 s"  # the fake clock does not move while the data load
    assert setup[2].startswith("setup: model: building " + str(small_config)) and setup[3].startswith(
        "setup: model: done in ")
    assert setup[4].startswith("setup: reference model: 2 steps") and setup[5].startswith(
        "setup: reference model: done in ")
    header = next(i for i, line in enumerate(lines) if line.startswith("cggr race: "))
    assert all(lines.index(line) < header for line in setup)
    starts = [line for line in lines if " · arm " in line]
    # seed 0 runs standard first, seed 1 random first (the order rotates with the seed)
    assert [s.split(":")[0] for s in starts] == [
        "seed 1 of 2 (seed 0) · arm 1 of 2", "seed 1 of 2 (seed 0) · arm 2 of 2",
        "seed 2 of 2 (seed 1) · arm 1 of 2", "seed 2 of 2 (seed 1) · arm 2 of 2"]
    # ladder: rung 0.5 decays 0.2 × 6 s = 1.2 s (1 step) off the main clock: each run is 2 + 12 + 1 = 15 s
    assert [s.split(" · ")[-1] for s in starts] == [
        "at least 53 s left in the race", "about 45 s left in the race", "about 30 s left in the race",
        "about 15 s left in the race"]
    assert all(a["steps"] == 12 and a["train_seconds"] == 12.0 for a in payload["arms"])
    # during every evaluation the display shows it (the clock is stopped), never a training status
    kinds = [k for k, _ in events]
    for i, (kind, what) in enumerate(events):
        if kind == "eval":
            last = next(text for k, text in reversed(events[:i]) if k == "status")
            assert "clock stopped" in last and not last.startswith("training"), (what, last)
            if what == "full":
                assert last.startswith("evaluating the full held-out set (8 blocks")
    assert kinds.count("eval") >= 4 * 3  # every run: probe points, the ladder rung, the full set
    # the bars (progress=True) name the seed and arm counts
    err = capsys.readouterr().err
    assert "s1/2 a1/2 standard" in err and "s2/2 a2/2 standard" in err and "trained" in err
    assert "evaluating 4 probe blocks (clock stopped)" in err  # drawn at once, not at the next training chunk
    assert "evaluating the full held-out set (8 blocks, clock stopped)" in err
    # the tables: 4 decimals for every loss, the same strings in the terminal and in the Markdown
    md = (tmp_path / "race.md").read_text()
    out = payload["paths"]
    assert out["md"].endswith("race.md")
    for a in payload["arms"]:
        assert f"{a['heldout_loss']:.4f}" in md
    for row in payload["summary_rows"]:
        assert row["held-out loss"].split(" ± ")[0] in md


# --------------------------------------------------------------------------------------- over the budget
def test_an_arm_that_overruns_its_budget_is_warned_about_and_marked_on_the_plot(small_config, corpus, tmp_path,
                                                                                 monkeypatch):
    """47 steps of 0.0625 s (2.9375 s of a 3 s budget), then one that takes 2 s although the estimate said 0.0625:
    the arm ends 1.9375 s past its budget. The log warns, the Markdown says so, the plot marks the arm's end and
    draws the budget."""
    from cggr.cli.plot import race_figure

    lines: list[str] = []
    clock = fake_clock.install(monkeypatch, [0.0625] * (2 + 47) + [2.0])
    payload = run_race(_config(small_config, corpus, tmp_path, minutes=0.05, arms=("standard",), evals=1),
                       log=lines.append, clock=clock)
    row = payload["arms"][0]
    assert row["steps"] == 48 and row["train_seconds"] == pytest.approx(4.9375, abs=1e-3)
    assert row["overrun_seconds"] == pytest.approx(1.9375, abs=1e-3)
    over = r"warning: standard \(seed 0\) trained 1\.93[78] s past its 3 s budget"
    warning = [line for line in lines if re.match(over, line)]
    assert len(warning) == 1
    assert "**Over budget**" in (tmp_path / "race.md").read_text()
    fig = race_figure(payload)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["standard: +1.94 s past budget"]
    budget = [line for line in ax.get_lines() if line.get_label().startswith("budget")]
    assert len(budget) == 1 and list(budget[0].get_xdata()) == pytest.approx([3.0, 3.0])
    assert "1.94 s over budget" in ax.get_legend().get_texts()[0].get_text()


# ------------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_arm_two_writes_arm_one_marked_partial(small_config, corpus, tmp_path, monkeypatch, capsys):
    lines: list[str] = []
    clock = fake_clock.install(monkeypatch, [0.0625])  # 9 steps in 0.6 s
    stepped = race_train.Arm.step

    def step(self, *args, **kwargs):
        if self.arm == "random":
            raise KeyboardInterrupt
        return stepped(self, *args, **kwargs)

    monkeypatch.setattr(race_train.Arm, "step", step)
    cfg = _config(small_config, corpus, tmp_path, minutes=0.01, arms=("standard", "random"))
    with pytest.raises(KeyboardInterrupt):
        run_race(cfg, log=lines.append, clock=clock)
    payload = json.loads((tmp_path / "race.json").read_text())
    assert [a["arm"] for a in payload["arms"]] == ["standard"] and payload["arms"][0]["steps"] == 9
    partial = payload["settings"]["partial"]
    assert partial == {"interrupted_during": "arm 2 of 2 (random) of seed 1 of 1 (seed 0)", "finished_runs": 1,
                       "planned_runs": 2}
    md = (tmp_path / "race.md").read_text()
    assert "**Partial results**: interrupted during arm 2 of 2 (random)" in md and "1 of 2 arm runs" in md
    assert any(line.startswith("interrupted during arm 2 of 2 (random)") for line in lines)
    assert "warning: partial results" in capsys.readouterr().out
    # the command: the partial files are written, the exit status is 130 (interrupted)
    monkeypatch.setattr("cggr.cli.race.run_race", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["race", "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_ctrl_c_before_any_arm_finished_writes_nothing(small_config, corpus, tmp_path, monkeypatch):
    clock = fake_clock.install(monkeypatch, [0.05])
    monkeypatch.setattr(race_train.Arm, "step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_race(_config(small_config, corpus, tmp_path, minutes=0.01, arms=("standard",)), log=lambda *_: None,
                 clock=clock)
    assert not (tmp_path / "race.json").exists()


# ------------------------------------------------------------------------------------------ report pieces
def test_tables_keep_four_decimals_in_markdown_and_terminal():
    from cggr.cli.tables import markdown_table, text_table

    rows = [{"arm": "standard", "held-out loss": 7.9973, "steps": 1234, "Δ": "+0.1 [-0.2, +0.4] tie"},
            {"arm": "cggr", "held-out loss": 8.0972, "steps": None, "Δ": "a|b"}]
    md = markdown_table(rows).splitlines()
    assert len(md) == 4 and all(line.startswith("|") and line.endswith("|") for line in md)
    assert re.fullmatch(r"\|-+(\|-+)+\|", md[1])
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md]
    assert cells[0] == ["arm", "held-out loss", "steps", "Δ"]
    assert cells[2] == ["standard", "7.9973", "1,234", "+0.1 [-0.2, +0.4] tie"]
    assert cells[3] == ["cggr", "8.0972", "–", "a\\|b"]  # the pipe escaped, the missing value a dash
    text = text_table(rows)
    assert "7.9973" in text and "8.0972" in text and "[-0.2, +0.4]" in text and "|" not in text.splitlines()[0]
    assert markdown_table([]) == "" and text_table([]) == ""


def test_tables_without_rich_show_the_same_cells(monkeypatch):
    """Where rich is not installed (the import fails) the plain writer draws the same Markdown, character for
    character, and the same terminal table but for the rule's character."""
    from cggr.cli.tables import markdown_table, text_table

    rows = [{"arm": "standard", "held-out loss": 7.9973, "steps": 1234, "Δ": "+0.1 [-0.2, +0.4] tie"},
            {"arm": "cggr-reducible-self", "held-out loss": 8.0972, "steps": None, "Δ": "a|b"}]
    with_rich = markdown_table(rows), text_table(rows)
    monkeypatch.setitem(sys.modules, "rich", None)  # `from rich import ...` now raises ImportError
    plain = markdown_table(rows), text_table(rows)
    assert plain[0] == with_rich[0]
    assert plain[1] == with_rich[1].replace("─", "-")


def test_long_plot_titles_are_wrapped_not_cut():
    from cggr.cli.plot import race_figure, wrap_title

    model = "/very/long/path/to/a/model/folder/that/a/user/raced/with/its/own/config/" + "x" * 40
    curve = [{"fraction": f, "time_s": 3.0 * f, "heldout_loss": 8.0 - f} for f in (0.0, 1.0)]
    payload = {"settings": {"model": model, "data": "code+packages", "minutes_per_arm": 0.05, "ratio": 0.25,
                            "scan_multiplier": 4.0},
               "environment": {"device": "NVIDIA H200 (a device name long enough to matter)"},
               "arms": [{"arm": "standard", "seed": 0, "steps": 10, "curve": curve, "heldout_loss": 7.0,
                         "train_seconds": 3.0, "overrun_seconds": 0.0}]}
    fig = race_figure(payload)
    title = fig.get_suptitle()
    full = (f"cggr race: {model} on code+packages · 0.05 min per arm · ratio 0.25 · scan ×4 · 1 seed(s) · "
            "NVIDIA H200 (a device name long enough to matter)")
    assert "\n" in title and title.replace("\n", "").replace(" ", "") == full.replace(" ", "")  # nothing cut
    limit = int(fig.get_figwidth() * 72 / (0.6 * 11)) - 4
    assert all(len(line) <= limit for line in title.splitlines())  # every line fits the figure
    assert wrap_title("short", 8, 11) == "short"


# ------------------------------------------------------------------------------------ command and versions
def test_version_and_python_dash_m_cggr(capsys):
    import cggr

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"cggr {cggr.__version__} (torch ")
    proc = subprocess.run([sys.executable, "-m", "cggr", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"cggr {cggr.__version__}")


def test_package_versions_come_from_the_installed_metadata():
    import importlib.metadata

    import torch

    import cggr
    from cggr.cli.main import info
    from cggr.cli.timing import environment, package_version

    assert package_version("transformers") == importlib.metadata.version("transformers") == transformers.__version__
    assert package_version("no-such-distribution-cggr") is None
    assert package_version("cggr") == cggr.__version__
    assert info()["transformers"] == transformers.__version__ and info()["cggr"] == cggr.__version__
    assert environment("cpu")["torch"] == torch.__version__


def test_router_layers_too_deep_is_refused_before_the_data_loads(monkeypatch, capsys):
    """The tiny preset has 6 layers: --router-layers 6 is refused at once (a first run's data load trains a
    tokenizer for about a minute before a later check would see it)."""

    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded before --router-layers was checked")

    monkeypatch.setattr(race_run, "load_data", no_data)
    assert main(["race", "--model", "tiny", "--router-layers", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cggr race: error: --router-layers must be < the model's 6 layers (tiny), got 6"
