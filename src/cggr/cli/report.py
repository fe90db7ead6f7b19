"""Outputs of ``cggr race``: the summary (intervals over paired seeds, time-to-target, per-group losses), the
tables (stdout and Markdown), the JSON record and the PNG plot; and ``--merge`` of races run in separate calls.

Statistics (:mod:`cggr.cli.stats`): each arm's final held-out loss over seeds with a Student-t 95% interval, and
its paired difference to ``standard`` and to ``random`` (same seed = same initial weights and data order) with a
paired Student-t 95% interval; a difference whose interval contains 0 is reported as a **tie**. With one seed
there is no interval; the held-out loss then carries its bootstrap standard error over held-out blocks (the
uncertainty of the held-out sample only, not of the training run).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from cggr.cli.plot import plot_curves
from cggr.cli.records import arm_names, row_seed, seeds_of
from cggr.cli.stats import mean_interval, paired_summary
from cggr.cli.tables import columns_of, count_cell, markdown_table, text_table

HOW_TO_READ = """\
How to read it: in each seed every arm trained the same initial model on the same sequence order (the A/A arm
`standard-aa` on another order) for the same wall-clock budget (evaluation excluded). *held-out loss* is the
next-token cross-entropy (nats) on files never trained on, lower is better: the mean over seeds ± the half-width
of its 95% Student-t interval (one seed: ± its bootstrap standard error over held-out blocks). *Δ vs standard* and
*Δ vs random* are paired differences (arm minus baseline, same seed) with their 95% interval; **tie** means the
interval contains 0: the race cannot tell the two apart. The A/A row (`standard-aa` − `standard`) is the race's
noise floor: two identical trainings that differ only in data order. *time to target* is the training time an
arm needs to reach `standard`'s final loss (same seed, probe blocks), read off the budget ladder (runs that
decay their learning rate at 25/50/75% of the budget) and interpolated linearly; *speed-up* = standard's time /
the arm's. *sequences* counts sequences read (the selecting arms scan more per step than they train on),
*backprop tok* the tokens through the full model's forward and backward, *epochs* the passes over the training
sequences an arm read. `random` keeps the same share of sequences as `cggr` but picks them at random without
running the router: if `cggr` does not beat `random`, the difficulty ranking did not help. `cggr-loss`
back-propagates through every scanned token (masking the loss does not shrink the backward through the
transformer body)."""


def time_to_target(row: dict[str, Any], target: float) -> float | None:
    """Seconds of training ``row``'s arm needs to reach held-out (probe) loss ``target``, or ``None``.

    Points valid at their own budget: the start (0 s, the initial loss), each ladder rung (its budget, the loss
    after its decay) and the end (the main run's time and final probe loss); the first crossing below ``target``
    is interpolated linearly between the two points around it. (:func:`race_summary` reports it only for rows
    with a ladder: races run with ``--ladder none`` or recorded before it have no valid points in between.)
    """
    pts: list[tuple[float, float]] = []
    curve = row.get("curve") or []
    if curve:
        pts.append((0.0, curve[0]["heldout_loss"]))
    pts += [(r["budget_s"], r["heldout_loss"]) for r in row.get("ladder") or [] if r.get("finite", True)]
    final = row.get("probe_loss", curve[-1]["heldout_loss"] if curve else None)
    if final is not None:
        pts.append((row["train_seconds"], final))
    pts.sort()
    for i, (t, loss) in enumerate(pts):
        if math.isfinite(loss) and loss <= target:
            if i == 0:
                return t
            t0, l0 = pts[i - 1]
            return t0 + (l0 - target) / (l0 - loss) * (t - t0) if l0 > loss else t
    return None


def _fmt_interval(iv, digits: int = 4) -> str:
    if iv is None:
        return "–"
    if iv.low is None:
        return f"{iv.mean:+.{digits}f} (1 seed)"
    tie = " tie" if iv.contains_zero else ""
    return f"{iv.mean:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]{tie}"


def race_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """Per arm, over the seeds of ``payload['arms']`` (one row per arm and seed): the final held-out loss with its
    interval, paired differences to ``standard`` and ``random``, time to ``standard``'s loss, per-group losses;
    and the A/A noise floor. Intervals as :func:`cggr.cli.stats.paired_summary` (Student-t, 95%)."""
    settings = payload.get("settings", {})
    rows = payload["arms"]
    names = arm_names(rows)
    by_arm: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
    for r in rows:
        by_arm[r["arm"]][row_seed(r, settings)] = r
    finals = {n: {s: r["heldout_loss"] for s, r in rs.items() if r.get("heldout_loss") is not None}
              for n, rs in by_arm.items()}
    finals = {n: v for n, v in finals.items() if v}
    vs = {b: paired_summary(finals, b) for b in ("standard", "random") if b in finals}
    standard = by_arm.get("standard", {})
    out_arms = []
    for n in names:
        rs = by_arm[n]
        seeds = sorted(rs)
        entry: dict[str, Any] = {"arm": n, "seeds": seeds}
        if n in finals:
            entry["heldout"] = mean_interval(list(finals[n].values())).as_dict()
            if len(seeds) == 1:
                entry["heldout"]["bootstrap_se"] = rs[seeds[0]].get("heldout_se")
        for b, summ in vs.items():
            diff = summ.get(n, {}).get("diff")
            entry[f"vs_{b}"] = None if diff is None else {**diff.as_dict(), "tie": diff.contains_zero}
        ttt = {}
        for s in seeds:
            if not rs[s].get("ladder"):  # without rungs there are no valid points between the start and the end
                continue
            base = standard.get(s)
            target = None if base is None else base.get("probe_loss", (base.get("curve") or [{}])[-1].get(
                "heldout_loss"))
            if target is not None:
                ttt[s] = time_to_target(rs[s], target)
        entry["time_to_target"] = ttt
        reached = [t for t in ttt.values() if t is not None]
        entry["time_to_target_mean"] = statistics.fmean(reached) if reached and len(reached) == len(ttt) else None
        speed = [standard[s]["train_seconds"] / t for s, t in ttt.items() if t]
        entry["speedup_mean"] = statistics.fmean(speed) if speed and len(speed) == len(ttt) else None
        groups: dict[str, dict[str, float]] = {}
        for s in seeds:
            for g, v in (rs[s].get("heldout_by_group") or {}).items():
                groups.setdefault(g, {})[s] = v["loss"]
        entry["groups"] = {g: {"mean": statistics.fmean(v.values()), "by_seed": v} for g, v in groups.items()}
        for key in ("steps", "epochs", "sequences_scanned", "tokens_scanned", "tokens_backpropagated",
                    "tokens_in_loss", "train_seconds", "last_train_loss", "accuracy"):
            vals = [rs[s][key] for s in seeds if rs[s].get(key) is not None]
            entry[key] = statistics.fmean(vals) if vals else None
        meds = [rs[s]["median_step_seconds"] for s in seeds if rs[s].get("median_step_seconds")]
        entry["median_step_seconds"] = statistics.median(meds) if meds else None
        out_arms.append(entry)
    summary: dict[str, Any] = {"arms": out_arms, "seeds": seeds_of(rows, settings),
                               "method": "paired Student-t 95% intervals over seeds (cggr.cli.stats)"}
    aa = next((e for e in out_arms if e["arm"] == "standard-aa"), None)
    if aa is not None and aa.get("vs_standard"):
        summary["noise_floor"] = aa["vs_standard"]
    return summary


def summary_rows(arms: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One display row per arm (means over seeds; the intervals of :func:`race_summary`)."""
    summ = race_summary({"settings": settings or {}, "arms": arms})
    one_seed = len(summ["seeds"]) == 1
    rows = []
    for e in summ["arms"]:
        h = e.get("heldout")
        if h is None:
            loss = None
        elif h.get("half_width") is not None:
            loss = f"{h['mean']:.4f} ± {h['half_width']:.4f}"
        elif h.get("bootstrap_se") is not None:
            loss = f"{h['mean']:.4f} ± {h['bootstrap_se']:.4f} SE"
        else:
            loss = f"{h['mean']:.4f}"
        row: dict[str, Any] = {
            "arm": e["arm"], "seeds": len(e["seeds"]), "steps": count_cell(e["steps"]),
            "sequences": count_cell(e["sequences_scanned"]),
            "backprop tok": count_cell(e["tokens_backpropagated"]), "step s (median)": e["median_step_seconds"],
            "epochs": e["epochs"], "train loss": e["last_train_loss"], "held-out loss": loss,
        }
        for b in ("standard", "random"):
            key = f"vs_{b}"
            if key in e:
                d = e[key]
                if e["arm"] == b:
                    row[f"Δ vs {b}"] = "–"
                elif d is None:
                    row[f"Δ vs {b}"] = None
                else:
                    row[f"Δ vs {b}"] = _fmt_delta(d, one_seed)
        if e["time_to_target"]:
            t = e["time_to_target_mean"]
            missing = sum(v is None for v in e["time_to_target"].values())
            row["time to target"] = (
                f"{t:.1f} s" + (f" ({e['speedup_mean']:.2f}×)" if e["speedup_mean"] else "") if t is not None
                else f"not reached in {missing} of {len(e['time_to_target'])} seed(s)")
        if e.get("accuracy") is not None:
            row["accuracy"] = f"{e['accuracy']:.1%}"
        rows.append(row)
    return rows


def _fmt_delta(d: dict[str, Any], one_seed: bool, *, tie: bool = True) -> str:
    if d.get("low") is None:
        return f"{d['mean']:+.4f}" + ("" if one_seed else " (1 seed)")
    tie = " tie" if d["tie"] and tie else ""
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{tie}"


def group_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Held-out loss per group (code / tests / prose) and arm, mean over seeds, with the paired Δ to standard."""
    std = next((e for e in summary["arms"] if e["arm"] == "standard"), None)
    rows = []
    for e in summary["arms"]:
        row: dict[str, Any] = {"arm": e["arm"]}
        for g, v in e["groups"].items():
            cell = f"{v['mean']:.4f}"
            if std is not None and e is not std and g in std["groups"]:
                diffs = [x - std["groups"][g]["by_seed"][s] for s, x in v["by_seed"].items()
                         if s in std["groups"][g]["by_seed"]]
                if diffs:
                    iv = mean_interval(diffs)
                    cell += f" ({_fmt_interval(iv)})" if iv.low is not None else f" ({iv.mean:+.4f})"
            row[g] = cell
        rows.append(row)
    return rows


def seed_rows(arms: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per arm and seed: the raw numbers behind the intervals."""
    out = []
    for a in sorted(arms, key=lambda r: (row_seed(r, settings), arm_names(arms).index(r["arm"]))):
        se = a.get("heldout_se")
        out.append({"seed": row_seed(a, settings), "arm": a["arm"], "order": a.get("order"), "steps": a["steps"],
                    "train s": a["train_seconds"], "held-out loss": a.get("heldout_loss"),
                    "bootstrap SE": se, "probe loss": a.get("probe_loss")})
    return out


def _label(a: dict[str, Any]) -> str:
    return a["arm"] if a.get("seed") is None else f"{a['arm']} (seed {a['seed']})"


def stall_warnings(arms: list[dict[str, Any]], factor: float = 5.0, device: str = "cpu") -> list[str]:
    """Arms slowed by other work on the machine.

    Flags an arm whose slowest step took over ``factor`` × its median, and (CPU runs) an arm whose process got
    less than 60% of its threads' CPU time while its steps ran (``cpu_utilisation``). An arm that trained past its
    budget: :func:`overrun_warnings`.
    """
    out = []
    for a in arms:
        util = a.get("cpu_utilisation")
        if device == "cpu" and util is not None and util < 0.6:
            out.append(f"{_label(a)}: the process got {util:.0%} of its threads' CPU time during its steps")
        med, worst = a.get("median_step_seconds"), a.get("max_step_seconds")
        if med and worst and worst > factor * med and worst - med > 0.5:
            out.append(f"{_label(a)}: slowest step {worst:.2f} s vs median {med:.3f} s")
    return out


def overrun_warnings(arms: list[dict[str, Any]]) -> list[str]:
    """Arm runs whose last step ended past their budget (``overrun_seconds`` > 0: the step was slower than the
    recent steps that the stop rule went by). The steps past the budget count in that arm's favour."""
    return [f"{_label(a)} trained {a['overrun_seconds']:.3f} s past its {a.get('budget_seconds', 0):g} s budget"
            for a in arms if (a.get("overrun_seconds") or 0) > 0]


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
            out.append(f"{_label(a)} read the training data {epochs:.1f} times{rise}")
    if out and data == "code":
        out.append("a larger corpus (e.g. --data code+packages) repeats less")
    return out


def head_line(settings: dict[str, Any]) -> str:
    """The header's sentence on the LM head the arms trained with (``settings['head']``, see ``--head``) and the
    precision it ran in (``settings['precision']``; races recorded before it: bf16 on CUDA, fp32 elsewhere)."""
    head = settings.get("head", _SETTING_DEFAULTS["head"])
    precision = settings.get("precision")
    if precision is None:
        device = str(settings.get("device", ""))
        bf16 = settings.get("dtype") == "bfloat16" or (settings.get("dtype", "auto") == "auto"
                                                       and device.startswith("cuda"))
        precision = "bf16 autocast" if bf16 else "fp32"
    if head == "fused":
        return ("LM head of every arm's training loss: fused (linear cross-entropy on the final hidden states, "
                f"fp32 logit math); {precision}")
    if head == "logits":
        where = "bf16 under autocast" if precision.startswith("bf16") else "fp32"
        return f"LM head of every arm's training loss: the model's logits ({where}, loss in fp32)"
    return f"LM head: {head}; {precision}"


def write_race_outputs(payload: dict[str, Any], out_dir: Path, name: str, *, plot: bool = True) -> dict[str, str]:
    """Write ``<out>/<name>.json``, ``.md`` and ``.png``; print the tables; return the paths written."""
    from cggr.cli.race.config import demo_note

    out_dir.mkdir(parents=True, exist_ok=True)
    s, env = payload["settings"], payload["environment"]
    summary = race_summary(payload)
    rows = summary_rows(payload["arms"], s)
    payload["summary"] = summary
    payload["summary_rows"] = rows
    paths = {"json": str(out_dir / f"{name}.json"), "md": str(out_dir / f"{name}.md")}
    if plot and plot_curves(payload, out_dir / f"{name}.png") is not None:
        paths["png"] = str(out_dir / f"{name}.png")
    seeds = summary["seeds"]
    info = s.get("data_info", {})
    md = [
        f"# cggr race: {s['model']} on {s['data']}", "",
        f"`{env['command']}`", "",
        f"{env['device']} · torch {env['torch']} · transformers {env['transformers']} · cggr {env['cggr']} · "
        f"{env['utc']}", "",
        f"{s['parameters'] / 1e6:.1f}M parameters, {s['num_layers']} layers; {s['minutes_per_arm']:g} min per arm; "
        f"{len(seeds)} seed(s) {seeds} (paired: same initial weights and data order per seed); protocol "
        f"{s.get('protocol', 'free-lunch')}: ratio {s['ratio']}, standard batch {s['batch_size']} sequences of "
        f"{info.get('seq_len')} tokens, selecting arms scan {s['scanned_per_step']} per step and train on "
        f"{s.get('trained_per_step')}; router {s['router_layers']} layers; peak lr {s['lr']}, {s['schedule']}; "
        f"{head_line(s)}. Held-out: {s.get('heldout_blocks', info.get('eval_sequences'))} blocks from "
        f"{info.get('heldout_files_used', '?')} held-out files (at most {s.get('heldout_cap', '?')} per file; "
        f"{_groups_text(info.get('heldout_groups'))}); curve and ladder on {s.get('probe_blocks', '?')} probe "
        "blocks.", "",
    ]
    partial = s.get("partial")
    if partial:  # Ctrl-C: the runs that finished, marked as such
        md.insert(2, f"**Partial results**: interrupted during {partial['interrupted_during']}; "
                  f"{partial['finished_runs']} of {partial['planned_runs']} arm runs finished and are reported "
                  "below (intervals and comparisons use only those).")
        md.insert(3, "")
    ref = s.get("reference")
    if ref:  # the reducible arms' one-off cost, on its own line (on no arm's clock)
        md += [f"Reference model (`--reference`, for the reducible arms): {ref['steps']} steps on "
               f"{ref['reference_blocks']} training blocks in {ref['train_seconds']:.1f} s, then scored the other "
               f"{ref['train_blocks']} blocks in {ref['score_seconds']:.1f} s (mean loss "
               f"{ref['mean_reference_loss']:.3f}): a one-off cost of {ref['total_seconds']:.1f} s that no arm's "
               f"clock includes. Every arm trained on those {ref['train_blocks']} blocks only"
               + (f" ({ref['unused_blocks']} further training blocks unused: --reference-blocks)."
                  if ref.get("unused_blocks") else "."), ""]
    demo = demo_note(s["model"], len(seeds))
    if demo:
        md += [f"*{demo[0].upper()}{demo[1:]}*", ""]
    md += [markdown_table(rows, columns_of(rows)), ""]
    md += _verdict_lines(summary)
    groups = group_rows(summary)
    if any(len(r) > 1 for r in groups):
        md += ["Held-out loss by kind of block (mean over seeds; Δ vs standard, paired, 95% interval):", "",
               markdown_table(groups, columns_of(groups)), ""]
    if len(seeds) > 1 or len(payload["arms"]) > 1:
        per_seed = seed_rows(payload["arms"], s)
        md += ["Per seed (order: position in that seed's running order):", "",
               markdown_table(per_seed, columns_of(per_seed)), ""]
    if payload.get("merged_from"):
        runs = [f"run {i}: `{Path(p).name}`" for i, p in enumerate(payload["merged_from"], start=1)]
        md += ["Merged from separate runs (" + "; ".join(runs) + "); arms are paired by seed across runs.", ""]
    stalls = stall_warnings(payload["arms"], device=s["device"])
    if stalls:
        md += ["**Contention** (other work on the machine slowed these arms' steps, which cost them budget, so the "
               "comparison is noisier than the table suggests): " + "; ".join(stalls) + ".", ""]
    overruns = overrun_warnings(payload["arms"])
    if overruns:
        md += ["**Over budget** (a last step slower than the recent ones that the stop rule went by; the steps past "
               "the budget count in the arm's favour; marked on the plot): " + "; ".join(overruns) + ".", ""]
    repeats = repeat_warnings(payload["arms"], s.get("data"))
    if repeats:
        md += ["**Repeated data**: " + "; ".join(repeats) + ". Past one epoch the held-out loss also measures "
               "memorisation, not only how fast an arm learns (compare *train loss* with *held-out loss*).", ""]
    if "png" in paths:
        md += [f"![held-out loss against wall-clock time]({name}.png)", ""]
    md += [HOW_TO_READ, ""]
    Path(paths["md"]).write_text("\n".join(md), encoding="utf-8")
    Path(paths["json"]).write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    print(text_table(rows))
    for line in _verdict_lines(summary):
        if line:
            print(line.replace("**", ""))
    if demo:
        print(demo)
    if repeats:
        print("warning: repeated data: " + "; ".join(repeats))
    for line in stalls:
        print(f"warning: contention in {line} (the machine was busy; rerun for a cleaner comparison)")
    for line in overruns:
        print(f"warning: over budget: {line} (marked on the plot)")
    if partial:
        print(f"warning: partial results: interrupted during {partial['interrupted_during']}; "
              f"{partial['finished_runs']} of {partial['planned_runs']} arm runs finished")
    print("wrote " + ", ".join(paths.values()))
    return paths


def _groups_text(groups: dict[str, int] | None) -> str:
    if not groups:
        return "no group labels"
    return ", ".join(f"{n} {g}" for g, n in groups.items())


def _verdict_lines(summary: dict[str, Any]) -> list[str]:
    """One sentence per comparison: the paired difference, its interval, and what it means."""
    lines = []
    floor = summary.get("noise_floor")
    if floor is not None:
        lines.append(f"**Noise floor** (A/A: `standard-aa` − `standard`, same weights, other data order): "
                     f"{_fmt_delta(floor, len(summary['seeds']) == 1)}.")
    for e in summary["arms"]:
        for b in ("standard", "random"):
            d = e.get(f"vs_{b}")
            if d is None or e["arm"] in (b, "standard", "standard-aa"):
                continue
            if d.get("low") is None:
                word = "single seed, no interval"
            elif d["tie"]:
                word = "tie (the interval contains 0)"
            else:
                word = "better" if d["mean"] < 0 else "worse"
            lines.append(f"`{e['arm']}` vs `{b}`: {_fmt_delta(d, True, tie=False)} nats → {word}.")
    return [*lines, ""] if lines else []


_SAME_SETTINGS = ("model", "parameters", "data", "minutes_per_arm", "ratio", "scan_multiplier", "batch_size",
                  "scanned_per_step", "router_layers", "lr", "ratio_warmup_steps", "scoring", "evals", "head",
                  "schedule", "ladder", "heldout_blocks", "heldout_cap", "probe_blocks", "dtype")


# settings added after races were recorded: the value those races implied
_SETTING_DEFAULTS = {
    "scoring": "combined",
    # before --head: standard on the HF logits, the CGGRModel arms fused on CUDA, cggr-loss fused where possible
    "head": "mixed (before --head: standard on the logits; cggr, random fused on CUDA; cggr-loss fused)",
    "schedule": "linear warm-up, cosine to 0 over each arm's budget (by elapsed time)",
    "ladder": [],
    "heldout_blocks": None,
    "heldout_cap": None,
    "probe_blocks": None,
    "dtype": "auto",
}


def merge_race_files(paths: list[Path]) -> dict[str, Any]:
    """Combine the rows of several ``race.json`` files of the same race, run in separate calls (by seed and/or by
    arm), into one payload whose summary pairs the arms by seed.

    Each (arm, seed) may appear once; every setting but the seeds and arms must agree; the arms of one seed must
    have started from the same initial weights (``init_digest``). A seed's arms may come from different runs
    (machines): the report then lists the runs, and the A/A arm's gap to ``standard`` includes that difference.

    Raises :class:`CLIError` naming the setting that differs, the (arm, seed) that appears twice, or the seed whose
    initial weights differ.
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
    seen: dict[tuple[str, int], str] = {}
    digests: dict[int, str] = {}
    for run, (path, payload) in enumerate(zip(paths, payloads), start=1):
        for key in _SAME_SETTINGS:
            mine = payload["settings"].get(key, _SETTING_DEFAULTS.get(key))
            theirs = first["settings"].get(key, _SETTING_DEFAULTS.get(key))
            if mine != theirs:
                raise CLIError(f"--merge: {str(path)!r} has {key}={mine!r}, the first file {theirs!r}; "
                               "not the same race")
        for key in ("train_sequences", "eval_sequences", "vocab_size"):  # the same corpus (machines differ)
            mine = payload["settings"].get("data_info", {}).get(key)
            theirs = first["settings"].get("data_info", {}).get(key)
            if mine != theirs:
                raise CLIError(f"--merge: {str(path)!r} has data_info.{key}={mine!r}, the first file {theirs!r}; "
                               "not the same data (another corpus or tokenizer on that machine?)")
        for arm in payload["arms"]:
            seed = row_seed(arm, payload["settings"])
            if (arm["arm"], seed) in seen:
                raise CLIError(f"--merge: arm {arm['arm']!r} of seed {seed} appears in more than one file "
                               f"({seen[(arm['arm'], seed)]!r} and {str(path)!r})")
            seen[(arm["arm"], seed)] = str(path)
            if digests.setdefault(seed, arm["init_digest"]) != arm["init_digest"]:
                raise CLIError(f"--merge: arm {arm['arm']!r} of seed {seed} in {str(path)!r} started from different "
                               "weights than the other arms of that seed")
            arms.append({**arm, "seed": seed, "run": run, "device": payload["environment"].get("device")})
    from cggr.cli.race.arms import ARM_SPECS

    order = {name: i for i, name in enumerate(ARM_SPECS)}
    arms.sort(key=lambda a: (a["seed"], order.get(a["arm"], len(order)), a["run"]))
    env = dict(first["environment"])
    env["command"] = " + ".join(p["environment"]["command"] for p in payloads)
    settings = dict(first["settings"])
    settings.pop("partial", None)  # an interrupted run's finished rows merge like any others
    settings["seeds"] = sorted({a["seed"] for a in arms})
    settings["arms"] = list(dict.fromkeys(a["arm"] for a in sorted(arms, key=lambda a: order.get(a["arm"], 99))))
    return {"settings": settings, "environment": env, "arms": arms, "merged_from": [str(p) for p in paths]}


__all__ = ["group_rows", "merge_race_files", "overrun_warnings", "plot_curves", "race_summary", "repeat_warnings",
           "seed_rows", "stall_warnings", "summary_rows", "text_table", "time_to_target", "write_race_outputs"]
