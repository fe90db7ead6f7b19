"""The plot of ``cggr race``: held-out (probe) loss against training wall-clock time, one line per arm (mean over
seeds), the budget ladder's rungs as hollow markers, an arm that trained past its budget marked at its end and the
budget drawn as a dotted line; accuracy beside it when measured. Titles are wrapped to the figure's width, never
cut."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

from cggr.cli.tables import cell, count_over_seeds


def wrap_title(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken at spaces into lines that fit ``width_inches`` at ``fontsize`` points (a character is about
    0.6 of the font size wide; 4 characters of margin); a word longer than a line is split."""
    chars = max(20, int(width_inches * 72 / (0.6 * fontsize)) - 4)
    return textwrap.fill(text, chars, break_on_hyphens=False)  # a word longer than a line (a path) is split


def overruns(payload: dict[str, Any]) -> dict[str, float]:
    """Per arm: the largest number of seconds any of its runs trained past its budget (arms that never did are
    left out)."""
    out: dict[str, float] = {}
    for a in payload["arms"]:
        over = a.get("overrun_seconds") or 0.0
        if over > 0:
            out[a["arm"]] = max(out.get(a["arm"], 0.0), over)
    return out


def race_figure(payload: dict[str, Any]):
    """The matplotlib figure of :func:`plot_curves` (``None`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from cggr.cli.race.arms import ARM_SPECS
    from cggr.cli.records import arm_names, seeds_of

    arms = payload["arms"]
    over = overruns(payload)
    has_acc = any("accuracy" in p for a in arms for p in a["curve"])
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 8, 5.5), squeeze=False)
    ax = axes[0][0]
    losses = []
    for name in arm_names(arms):
        rows = [a for a in arms if a["arm"] == name]
        spec = ARM_SPECS.get(name)
        color, marker = (spec.color, spec.marker) if spec is not None else (None, ".")
        n = min(len(a["curve"]) for a in rows)
        t = [statistics.fmean(a["curve"][i]["time_s"] for a in rows) for i in range(n)]
        y = [statistics.fmean(a["curve"][i]["heldout_loss"] for a in rows) for i in range(n)]
        losses += y[1:]
        steps = cell(count_over_seeds([a["steps"] for a in rows]))  # 51.3 over seeds, not 51 nor 51.3000
        label = f"{name} ({steps} steps" + (f", mean of {len(rows)} seeds" if len(rows) > 1 else "")
        label += f"; {over[name]:.2f} s over budget)" if name in over else ")"
        ax.plot(t, y, label=label, color=color, marker=marker, linewidth=1.8, markersize=5)
        if name in over and n:  # the end of an arm that trained past its budget: a red ring and a note
            ax.plot([t[-1]], [y[-1]], marker="o", markersize=14, markerfacecolor="none", markeredgecolor="red",
                    markeredgewidth=1.8, linestyle="none")
            ax.annotate(f"{name}: +{over[name]:.2f} s past budget", (t[-1], y[-1]), textcoords="offset points",
                        xytext=(-8, 12), ha="right", fontsize=8, color="red")
        rungs = sorted({r["rung"] for a in rows for r in a.get("ladder") or []})
        pts = []
        for rung in rungs:
            got = [r for a in rows for r in a.get("ladder") or [] if r["rung"] == rung]
            if len(got) == len(rows):
                pts.append((statistics.fmean(r["budget_s"] for r in got),
                            statistics.fmean(r["heldout_loss"] for r in got)))
        if pts:
            pts.append((t[-1], y[-1]))
            ax.plot(*zip(*pts), color=color, marker=marker, linestyle=":", markerfacecolor="none",
                    markersize=9, linewidth=1.0)
            losses += [p[1] for p in pts]
        if has_acc:
            acc = [(a["curve"][i]["time_s"], 100 * a["curve"][i]["accuracy"]) for a in rows[:1] for i in range(n)
                   if "accuracy" in a["curve"][i]]
            if acc:
                axes[0][1].plot(*zip(*acc), label=name, color=color, marker=marker, linewidth=1.8, markersize=5)
    s, env = payload["settings"], payload["environment"]
    budget = 60.0 * s["minutes_per_arm"]
    if over:  # the budget, so that the marked ends are seen to lie past it
        ax.axvline(budget, color="red", linestyle=":", linewidth=1.0, label=f"budget ({budget:g} s)")
    losses = [x for x in losses if math.isfinite(x)]
    if losses:  # zoom past the initial loss (it is identical for every arm and dwarfs the differences)
        lo, hi = min(losses), max(losses)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.08 * (hi - lo + 1e-9))
    width = fig.get_figwidth() / len(axes[0])
    ax.set_xlabel("training wall-clock time per arm (s; evaluation excluded)")
    ax.set_ylabel("held-out loss on the probe blocks (nats/token)")
    ax.set_title(wrap_title("lines: the run (WSD schedule); hollow markers: budget ladder (decayed runs)", width, 9),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_acc:
        axes[0][1].set_xlabel("training wall-clock time per arm (s)")
        axes[0][1].set_ylabel("held-out exact-match accuracy (%)")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend(fontsize=8)
    title = (f"cggr race: {s['model']} on {s['data']} · {s['minutes_per_arm']:g} min per arm · ratio {s['ratio']} · "
             f"scan ×{s['scan_multiplier']:.3g} · {len(seeds_of(arms, s))} seed(s) · {env['device']}")
    if s.get("partial"):
        title += f" · PARTIAL: interrupted during {s['partial']['interrupted_during']}"
    fig.suptitle(wrap_title(title, fig.get_figwidth(), 11), fontsize=11)
    fig.tight_layout()
    return fig


def plot_curves(payload: dict[str, Any], path: Path) -> Path | None:
    """Write :func:`race_figure` to ``path`` (PNG); ``None`` (nothing written) without matplotlib."""
    fig = race_figure(payload)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["overruns", "plot_curves", "race_figure", "wrap_title"]
