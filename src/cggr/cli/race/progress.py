"""What ``cggr race`` shows while it runs: a line per setup phase (with a live elapsed time while it runs), then
per arm run a line "seed i of S · arm x of N" with the time left in the whole race, and a bar whose status says
what the arm is doing (warm-up, training, evaluating, a budget-ladder rung), shown as soon as it changes, and on a
terminal keeps ticking while it evaluates.

The time left: (runs not finished) × the mean wall-clock time of the finished runs, minus what the current run has
already spent. Before the first run finishes it is a lower bound: each run's training budget plus its ladder
branches' decay time, evaluations not counted (the line says "at least").

Every time here is read from ``clock`` (``time.perf_counter`` in a real race; tests pass a fake one), so the
estimates are exact and testable.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def format_duration(seconds: float) -> str:
    """``'45 s'``, ``'3 min 05 s'``, ``'1 h 02 min'`` (whole seconds, rounded)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the bench extra): lines only, no bars
        return None
    return tqdm


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Ticker:
    """Refreshes a bar every ``interval`` seconds from a daemon thread, so that its elapsed time and status keep
    moving while the main thread evaluates (tqdm redraws only when it is updated)."""

    def __init__(self, refresh: Callable[[], None], interval: float):
        self._refresh, self._interval = refresh, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cggr-race-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._refresh()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class RaceProgress:
    """The race's progress display and time-left estimate.

    Args:
        seeds: Replicates (S).
        arms: Arms per replicate (N).
        budget: Training seconds per arm run.
        ladder_seconds: Off-clock training seconds per arm run of the budget ladder's decay branches (0.2 · the sum
            of the rung fractions · the budget): known before any run, unlike the evaluations' time.
        bars: Draw tqdm bars (``--no-progress`` turns them off; without tqdm there are none). The lines are logged
            either way.
        log: Where the lines go (``print`` in the command).
        clock: Wall clock, seconds.
        tick: Seconds between the redraws of a bar by :class:`_Ticker`.
    """

    def __init__(self, *, seeds: int, arms: int, budget: float, ladder_seconds: float = 0.0, bars: bool = True,
                 log: Callable[[str], Any] = print, clock: Callable[[], float] = time.perf_counter,
                 tick: float = 1.0):
        self.seeds, self.arms, self.budget, self.ladder_seconds = seeds, arms, budget, ladder_seconds
        self.log, self.clock, self.tick = log, clock, tick
        self._tqdm = _tqdm() if bars else None
        self.run_seconds: list[float] = []  # wall-clock time of each finished run
        self.status_text = "setup"
        self.arm: str | None = None
        self._arm_start: float | None = None
        self._trained = 0.0
        self._bar = None
        self._ticker: _Ticker | None = None
        self._phase, self._phase_bar = "", None

    @property
    def runs(self) -> int:
        return self.seeds * self.arms

    # ------------------------------------------------------------------------------------------- setup
    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """A setup phase: logs ``setup: <name>: <detail> …`` before it starts and ``setup: <name>: done in <t>``
        after it,
        with a live elapsed-time bar in between when bars are on and stderr is a terminal (nothing is left on a
        redirected stderr, whose last line stays the error message when a phase fails)."""
        self.status_text = f"setup: {name}"
        self.log(f"setup: {name}: {detail} …" if detail else f"setup: {name} …")
        start = self.clock()
        self._phase = name
        bar = None
        if self._tqdm is not None and _is_terminal(sys.stderr):  # a live clock only where it can be redrawn
            bar = self._tqdm(total=None, desc=f"setup: {name}", bar_format="{desc}: {elapsed}", leave=False)
            self._start_ticker(bar)
        self._phase_bar = bar
        try:
            yield
        finally:
            self._stop_ticker()
            self._phase_bar = None
            if bar is not None:
                bar.close()
        self.log(f"setup: {name}: done in {format_duration(self.clock() - start)}")

    def phase_step(self, done: int, total: int) -> None:
        """Step ``done`` of ``total`` of the current setup phase (the reference model's training): shown in the
        phase's bar, and logged at each quarter so that a log without bars also moves."""
        self.status_text = f"setup: {self._phase}: step {done} of {total}"
        if self._phase_bar is not None:
            self._phase_bar.set_description_str(self.status_text, refresh=False)
        elif done < total and done * 4 // total != (done - 1) * 4 // total:
            self.log(self.status_text)

    # -------------------------------------------------------------------------------------------- runs
    def seconds_left(self) -> tuple[float, bool]:
        """(seconds left in the whole race, whether that is only a lower bound: no run has finished yet)."""
        done = len(self.run_seconds)
        per_run = statistics.fmean(self.run_seconds) if done else self.budget + self.ladder_seconds
        if self._arm_start is None:
            return per_run * (self.runs - done), not done
        spent = self.clock() - self._arm_start
        current = max(per_run - spent, self.budget - self._trained, 0.0)
        return current + per_run * (self.runs - done - 1), not done

    def left_text(self) -> str:
        """``about 3 min 05 s left`` (or ``at least …`` before the first run has finished)."""
        seconds, lower = self.seconds_left()
        return f"{'at least' if lower else 'about'} {format_duration(seconds)} left in the race"

    def start_arm(self, seed_index: int, arm_index: int, arm: str, seed: int) -> None:
        """Run ``arm_index`` (0-based) of replicate ``seed_index`` (0-based; init seed ``seed``) begins."""
        self._stop_ticker()
        self.arm, self._trained, self._arm_start = arm, 0.0, self.clock()
        where = f"seed {seed_index + 1} of {self.seeds} (seed {seed}) · arm {arm_index + 1} of {self.arms}"
        self.log(f"{where}: {arm}, {format_duration(self.budget)} of training · {self.left_text()}")
        self.status_text = "warm-up"
        if self._tqdm is not None:
            self._bar = self._tqdm(
                total=round(self.budget, 1), desc=f"s{seed_index + 1}/{self.seeds} a{arm_index + 1}/{self.arms} "
                f"{arm}", unit="s", leave=True, mininterval=0.5,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s trained{postfix}")
            self._postfix()
            if _is_terminal(sys.stderr):  # redrawn every second on a terminal; a log file gets the updates only
                self._start_ticker(self._bar, postfix=True)

    def status(self, text: str) -> None:
        """What the current run is doing now (shown at once, not at the next training chunk)."""
        self.status_text = text
        self._postfix(refresh=True)

    def trained(self, seconds: float, steps: int, loss: float) -> None:
        """``seconds`` more of training (the bar's progress); ``steps`` and the last ``loss`` so far."""
        self._trained += seconds
        self.status_text = f"training, step {steps}, loss {loss:.3f}"
        if self._bar is not None:
            self._bar.update(seconds)
            self._postfix(refresh=False)

    def end_arm(self) -> float:
        """The current run is finished (evaluated); returns its wall-clock seconds."""
        self._stop_ticker()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        seconds = self.clock() - (self._arm_start if self._arm_start is not None else self.clock())
        self.run_seconds.append(seconds)
        self._arm_start, self.arm, self.status_text = None, None, "between runs"
        return seconds

    def close(self) -> None:
        """Stop the ticker and close the bar (also after an interrupt)."""
        self._stop_ticker()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------------------------------ helpers
    def _postfix(self, refresh: bool = True) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.status_text} · {self.left_text()}", refresh=refresh)

    def _start_ticker(self, bar, postfix: bool = False) -> None:
        self._stop_ticker()
        self._ticker = _Ticker(self._postfix if postfix else bar.refresh, self.tick)

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None


__all__ = ["RaceProgress", "format_duration"]
