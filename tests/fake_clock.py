"""A fake training clock for race tests: budgets, step counts and the stop rule exact and independent of the
machine's load (no wall-clock in tests)."""

from __future__ import annotations


class FakeClock:
    """A training clock that advances only when an arm takes a step: each step costs the next of ``durations``
    (cycled), so budgets, step counts and the stop rule are exact and independent of the machine."""

    def __init__(self, durations):
        self.now, self.durations, self.i = 0.0, list(durations), 0
        self.steps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        dt = self.durations[self.i % len(self.durations)]
        self.i += 1
        self.now += dt
        self.steps.append(dt)


def install(monkeypatch, durations) -> FakeClock:
    """A :class:`FakeClock` that every ``cggr.cli.race.Arm.step`` advances; pass it as ``run_race(clock=...)``."""
    from cggr.cli import race

    clock = FakeClock(durations)
    real_step = race.Arm.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        clock.advance()
        return out

    monkeypatch.setattr(race.Arm, "step", step)
    return clock
