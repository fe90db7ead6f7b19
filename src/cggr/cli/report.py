"""Outputs of ``cggr race``: the summary table (stdout and Markdown), the JSON record and the PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cggr.cli.timing import markdown_table

HOW_TO_READ = """\
How to read it: every arm trained the same initial model on the same sequence order for the same wall-clock
budget (evaluation excluded). *held-out loss* is the next-token cross-entropy (nats) on files never trained on;
lower is better, and *Δ loss* is the difference to `standard` (negative = better than plain training).
*sequences* counts sequences read (the selecting arms scan more per step than they train on), *backprop tok* the
tokens that went through the full model's forward and backward, *loss tok* the tokens whose loss was trained on,
*epochs* the passes over the training sequences that an arm read (scanned), *train loss* its last training
batch's loss. `random` keeps the same share of sequences as `cggr` but picks them at random without running the
router: if `cggr` does not beat `random`, the difficulty ranking did not help. `cggr-loss` back-propagates
through every scanned token (masking the loss does not shrink the backward through the transformer body)."""


def _anchor(arms: list[dict[str, Any]], arm: dict[str, Any]) -> dict[str, Any] | None:
    """The ``standard`` arm that ``arm`` is compared with: the one of the same run (machine), else the first."""
    standards = [a for a in arms if a["arm"] == "standard"]
    same = [a for a in standards if a.get("run") == arm.get("run")]
    return (same or standards or [None])[0]


def summary_rows(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One display row per arm, with differences to ``standard`` (of the same run, in merged races)."""
    rows = []
    for a in arms:
        base = _anchor(arms, a)
        loss, acc = a.get("heldout_loss"), a.get("accuracy")
        row = {
            "arm": a.get("label", a["arm"]),
            "steps": a["steps"],
            "sequences": a["sequences_scanned"],
            "tokens": a["tokens_scanned"],
            "backprop tok": a["tokens_backpropagated"],
            "loss tok": a["tokens_in_loss"],
            "train s": a["train_seconds"],
            "step s (median)": a.get("median_step_seconds"),
            "epochs": a.get("epochs"),
            "train loss": a.get("last_train_loss"),
            "held-out loss": loss,
        }
        if base is not None and loss is not None and base.get("heldout_loss") is not None:
            diff = loss - base["heldout_loss"]
            row["Δ loss"] = f"{diff:+.4f} ({diff / base['heldout_loss']:+.1%})" if a is not base else "–"
        if acc is not None:
            row["accuracy"] = f"{acc:.1%}"
            if base is not None and base.get("accuracy") is not None:
                row["Δ acc"] = f"{100 * (acc - base['accuracy']):+.1f} pt" if a is not base else "–"
        rows.append(row)
    return rows


def stall_warnings(arms: list[dict[str, Any]], factor: float = 5.0, device: str = "cpu") -> list[str]:
    """Arms slowed by other work on the machine.

    Flags an arm whose slowest step took over ``factor`` × its median, and (CPU runs) an arm whose process got
    less than 60% of its threads' CPU time while its steps ran (``cpu_utilisation``).
    """
    out = []
    for a in arms:
        util = a.get("cpu_utilisation")
        if device == "cpu" and util is not None and util < 0.6:
            out.append(f"{a['arm']}: the process got {util:.0%} of its threads' CPU time during its steps")
        med, worst = a.get("median_step_seconds"), a.get("max_step_seconds")
        if med and worst and worst > factor * med and worst - med > 0.5:
            out.append(f"{a['arm']}: slowest step {worst:.2f} s vs median {med:.3f} s")
    return out


def repeat_warnings(arms: list[dict[str, Any]], data: str | None = None) -> list[str]:
    """Arms that read their training data more than once (``epochs`` > 1).

    Past one epoch the held-out loss also measures memorisation: an arm that repeats the data more (or, like
    ``cggr``, keeps choosing the sequences it has not memorised yet) can end worse although it trains faster.
    """
    out = []
    for a in arms:
        epochs = a.get("epochs")
        if epochs is not None and epochs > 1.0:
            best = min((p["heldout_loss"] for p in a.get("curve", [])[1:]), default=None)
            rise = ""
            if best is not None and a.get("heldout_loss") is not None and a["heldout_loss"] > best + 1e-3:
                rise = f", held-out loss rose from its best {best:.3f} to {a['heldout_loss']:.3f}"
            out.append(f"{a['arm']} read the training data {epochs:.1f} times{rise}")
    if out and data == "code":
        out.append("a larger corpus (e.g. --data code+packages) repeats less")
    return out


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def text_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal."""
    cols = _columns(rows)

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot_curves(payload: dict[str, Any], path: Path) -> Path | None:
    """Held-out loss (and accuracy, when measured) against training wall-clock time, one line per arm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms = payload["arms"]
    has_acc = any("accuracy" in p for a in arms for p in a["curve"])
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 8, 5), squeeze=False)
    styles = {"standard": ("black", "o"), "cggr": ("tab:red", "s"), "cggr-loss": ("tab:blue", "^"),
              "random": ("tab:gray", "x")}
    for a in arms:
        color, marker = styles.get(a["arm"], (None, "."))
        label, style = a.get("label", a["arm"]), "--" if a.get("run", 1) > 1 else "-"
        t = [p["time_s"] for p in a["curve"]]
        axes[0][0].plot(t, [p["heldout_loss"] for p in a["curve"]], label=f"{label} ({a['steps']} steps)",
                        color=color, marker=marker, linestyle=style, linewidth=1.8, markersize=5)
        if has_acc:
            pts = [(p["time_s"], 100 * p["accuracy"]) for p in a["curve"] if "accuracy" in p]
            axes[0][1].plot(*zip(*pts), label=label, color=color, marker=marker, linestyle=style, linewidth=1.8,
                            markersize=5)
    s = payload["settings"]
    losses = [p["heldout_loss"] for a in arms for p in a["curve"][1:] if math.isfinite(p["heldout_loss"])]
    if losses:  # zoom past the initial loss (it is identical for every arm and dwarfs the differences)
        lo, hi = min(losses), max(losses)
        axes[0][0].set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    axes[0][0].set_xlabel("training wall-clock time per arm (s; evaluation excluded)")
    axes[0][0].set_ylabel("held-out loss (nats/token, lower is better)")
    axes[0][0].grid(alpha=0.3)
    axes[0][0].legend()
    if has_acc:
        axes[0][1].set_xlabel("training wall-clock time per arm (s)")
        axes[0][1].set_ylabel("held-out exact-match accuracy (%)")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend()
    env = payload["environment"]
    fig.suptitle(
        f"cggr race: {s['model']} on {s['data']} · {s['minutes_per_arm']:g} min per arm · ratio {s['ratio']} · "
        f"scan ×{s['scan_multiplier']:.3g} · {env['device']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


HEAD_TEXT = {
    "fused": "LM head of every arm's training loss: fused (linear cross-entropy on the final hidden states, "
             "fp32 logit math)",
    "logits": "LM head of every arm's training loss: the model's logits (bf16 under autocast, loss in fp32)",
}


def head_line(settings: dict[str, Any]) -> str:
    """The header's sentence on the LM head the arms trained with (``settings['head']``, see ``--head``)."""
    head = settings.get("head", _SETTING_DEFAULTS["head"])
    return HEAD_TEXT.get(head, f"LM head: {head}")


def write_race_outputs(payload: dict[str, Any], out_dir: Path, name: str, *, plot: bool = True) -> dict[str, str]:
    """Write ``<out>/<name>.json``, ``.md`` and ``.png``; print the table; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(payload["arms"])
    payload["summary"] = rows
    paths = {"json": str(out_dir / f"{name}.json"), "md": str(out_dir / f"{name}.md")}
    if plot and plot_curves(payload, out_dir / f"{name}.png") is not None:
        paths["png"] = str(out_dir / f"{name}.png")
    s, env = payload["settings"], payload["environment"]
    md = [
        f"# cggr race: {s['model']} on {s['data']}", "",
        f"`{env['command']}`", "",
        f"{env['device']} · torch {env['torch']} · transformers {env['transformers']} · cggr {env['cggr']} · "
        f"{env['utc']}", "",
        f"{s['parameters'] / 1e6:.1f}M parameters, {s['num_layers']} layers; {s['minutes_per_arm']:g} min per arm; "
        f"ratio {s['ratio']}; standard batch {s['batch_size']} sequences of {s['data_info']['seq_len']} tokens; "
        f"selecting arms scan {s['scanned_per_step']} per step; router {s['router_layers']} layers; "
        f"peak lr {s['lr']}, {s['schedule']}; {head_line(s)}.", "",
        markdown_table(rows, _columns(rows)), "",
    ]
    if payload.get("merged_from"):
        runs = [f"run {i}: `{Path(p).name}`" for i, p in enumerate(payload["merged_from"], start=1)]
        md += ["Merged from separate runs (" + "; ".join(runs) + "). Wall-clock races depend on the machine: "
               "each arm's Δ is to the `standard` arm of its own run where that run has one.", ""]
    stalls = stall_warnings(payload["arms"], device=payload["settings"]["device"])
    if stalls:
        md += ["**Contention** (other work on the machine slowed these arms' steps, which cost them budget, so the "
               "comparison is noisier than the table suggests): " + "; ".join(stalls) + ".", ""]
    repeats = repeat_warnings(payload["arms"], payload["settings"].get("data"))
    if repeats:
        md += ["**Repeated data**: " + "; ".join(repeats) + ". Past one epoch the held-out loss also measures "
               "memorisation, not only how fast an arm learns (compare *train loss* with *held-out loss*).", ""]
    if "png" in paths:
        md += [f"![held-out loss against wall-clock time]({name}.png)", ""]
    md += [HOW_TO_READ, ""]
    Path(paths["md"]).write_text("\n".join(md), encoding="utf-8")
    Path(paths["json"]).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(text_table(rows))
    if repeats:
        print("warning: repeated data: " + "; ".join(repeats))
    for line in stalls:
        print(f"warning: contention in {line} (the machine was busy; rerun for a cleaner comparison)")
    print("wrote " + ", ".join(paths.values()))
    return paths


_SAME_SETTINGS = ("model", "parameters", "data", "minutes_per_arm", "ratio", "scan_multiplier", "batch_size",
                  "scanned_per_step", "router_layers", "lr", "seed", "ratio_warmup_steps", "scoring", "evals", "head")


# settings added after races were recorded: the value those races implied
_SETTING_DEFAULTS = {
    "scoring": "combined",
    # before --head: standard on the HF logits, the CGGRModel arms fused on CUDA, cggr-loss fused where possible
    "head": "mixed (before --head: standard on the logits; cggr, random fused on CUDA; cggr-loss fused)",
}


def merge_race_files(paths: list[Path]) -> dict[str, Any]:
    """Combine the arms of several ``race.json`` files of the same race (e.g. arms run in separate sessions).

    Each file is a *run* (numbered from 1 in the order given). Wall-clock races depend on the machine, so a run
    made on another machine should carry its own ``standard`` arm: ``standard`` may appear in several files (each
    labelled ``standard (run i)``), and every other arm's Δ is to the ``standard`` of its own run when there is
    one. Any other arm may appear once.

    Raises :class:`CLIError` naming the setting that differs, the arm that appears twice, or an initial-weights
    digest that differs (the arms would not have started from the same model).
    """
    from cggr.cli.presets import CLIError

    payloads = []
    for path in paths:
        try:
            payloads.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise CLIError(f"--merge: cannot read {str(path)!r} ({exc})") from exc
    first = payloads[0]
    arms: list[dict[str, Any]] = []
    for run, (path, payload) in enumerate(zip(paths, payloads), start=1):
        for key in _SAME_SETTINGS:
            mine = payload["settings"].get(key, _SETTING_DEFAULTS.get(key))
            theirs = first["settings"].get(key, _SETTING_DEFAULTS.get(key))
            if mine != theirs:
                raise CLIError(f"--merge: {str(path)!r} has {key}={mine!r}, the first file {theirs!r}; "
                               "not the same race")
        for arm in payload["arms"]:
            if arm["arm"] != "standard" and any(a["arm"] == arm["arm"] for a in arms):
                raise CLIError(f"--merge: arm {arm['arm']!r} appears in more than one file")
            if arms and arm["init_digest"] != arms[0]["init_digest"]:
                raise CLIError(f"--merge: arm {arm['arm']!r} in {str(path)!r} started from different weights")
            arms.append({**arm, "run": run, "device": payload["environment"].get("device")})
    standards = sum(a["arm"] == "standard" for a in arms)
    for a in arms:
        if a["arm"] == "standard" and standards > 1:
            a["label"] = f"standard (run {a['run']})"
    order = {"standard": 0, "cggr": 1, "cggr-loss": 2, "random": 3}
    arms.sort(key=lambda a: (order.get(a["arm"], 9), a["run"]))
    env = dict(first["environment"])
    env["command"] = " + ".join(p["environment"]["command"] for p in payloads)
    return {"settings": first["settings"], "environment": env, "arms": arms,
            "merged_from": [str(p) for p in paths]}


__all__ = ["merge_race_files", "plot_curves", "repeat_warnings", "summary_rows", "text_table", "write_race_outputs"]
