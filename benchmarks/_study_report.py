"""Summary and Markdown of the equal-steps selection study (benchmarks/study_selection.py): per-rule means, paired
95% intervals to ``random`` over seeds, where the picks fall, and the rule x regime table of ``--combine``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from cggr.cli.stats import paired_interval

CATEGORIES = ("code", "prose", "noise")


def summarise(runs: list[dict[str, Any]], rules: list[str]) -> list[dict[str, Any]]:
    by = {(r["rule"], r["seed"]): r for r in runs}
    rows = []
    for rule in rules:
        mine = [r for r in runs if r["rule"] == rule]
        if not mine:
            continue
        seeds = [r["seed"] for r in mine]
        row: dict[str, Any] = {"rule": rule, "seeds": seeds, "finals": [r["final"] for r in mine],
                               "final_mean": statistics.fmean(r["final"] for r in mine)}
        for base in ("random", "all"):
            paired = [r for r in mine if (base, r["seed"]) in by]
            if paired and rule != base:
                base_finals = [by[(base, r["seed"])]["final"] for r in paired]
                ci = paired_interval([r["final"] for r in paired], base_finals)  # Student-t, 95%
                pairs = [r["final"] - b for r, b in zip(paired, base_finals)]
                row[f"vs_{base}"] = {"n": ci.n, "mean": ci.mean, "low": ci.low, "high": ci.high, "sd": ci.sd,
                                     "deltas": pairs, "won": sum(d < 0 for d in pairs)}
        for c in CATEGORIES:
            vals = [r["final_by_category"][c] for r in mine if c in r["final_by_category"]]
            if vals:
                row[f"final_{c}"] = statistics.fmean(vals)
        row["picks_decile_share"] = np.mean([r["picks_decile_share"] for r in mine], axis=0).round(3).tolist()
        row["picks_category_share"] = {c: round(statistics.fmean(r["picks_category_share"][c] for r in mine), 3)
                                       for c in CATEGORIES}
        for key in ("picks_mean_rank", "picks_learner_loss", "scanned_learner_loss"):
            vals = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.fmean(vals) if vals else None
        for key in ("train_time_scans", "picks_unseen_share", "scanned_unseen_share", "pool_trained_share"):
            vals = [r[key] for r in mine if r.get(key) is not None]  # absent from runs before the stale rules
            row[key] = statistics.fmean(vals) if vals else None
        steps = [p["step"] for p in mine[0]["curve"]]
        row["curve_mean"] = [{"step": s, "heldout": statistics.fmean(r["curve"][i]["all"] for r in mine)}
                             for i, s in enumerate(steps)]
        row["seconds_mean"] = statistics.fmean(r["seconds"] for r in mine)
        rows.append(row)
    return rows


def _ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    if d["low"] is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def markdown(payload: dict[str, Any]) -> str:
    s, env, info = payload["settings"], payload["environment"], payload["setup"]
    rows = payload["summary"]
    ref = info["reference"]
    lines = [f"# Selection study, regime `{s['regime']}`", "", payload.get("hypothesis", ""), "",
             *([f"Note: {payload['note']}", ""] if payload.get("note") else []),
             f"Model: Llama {s['layers']} x {s['hidden']} (intermediate {s['intermediate']}, "
             f"{s['parameters'] / 1e6:.2f}M parameters), `{s['data']}` corpus, T={s['seq_len']}, vocabulary "
             f"{s['vocab']}. {s['steps']} optimizer steps per run, each scanning S={s['scan']} sequences of the "
             f"pool and training on k={s['kept']}; "
             f"AdamW peak lr {s['lr']}, warm-up 5% then cosine to 0. Pool: {info['pool_blocks']} blocks of half A "
             f"({s['epochs']} epoch(s) per run); seeds {s['seeds']} (same seed = same initial weights and stream for "
             f"every rule). Held-out: {info['eval_blocks']} blocks of held-out documents.", ""]
    if "init" in info:
        i = info["init"]
        lines += [f"Initial model: pre-trained on `{i['corpus']}` for {i['steps']} steps x {i['batch']} (lr "
                  f"{i['lr']}), held-out {i['heldout_loss']:.3f}, {i['train_seconds']:.0f} s one-off.", ""]
    if s["noise"]:
        lines += [f"Noise: {s['noise']:.0%} of the pool's and of half B's blocks replaced (half uniform random tokens, "
                  "half the block's own tokens shuffled); held-out data clean.", ""]
    lines += [f"Reference model: the same model trained {ref['steps']} steps x {ref['batch']} (lr {ref['lr']}) on "
              f"{ref['trained_on']} (never on the pool, never on held-out data), from the same kind of initial "
              f"model as the rules; held-out {ref['heldout_loss']:.3f}. One-off cost: {ref['train_seconds']:.0f} s "
              f"training + {ref['score_seconds']:.0f} s scoring the {ref['scored_blocks']} pool blocks once "
              f"(cached per block)" + (f"; CPU time {ref['train_cpu_seconds']:.0f} s + {ref['score_cpu_seconds']:.0f} s"
                                       if "train_cpu_seconds" in ref else "") + ".", "",
              "Pool composition: " + ", ".join(f"{c} {v:.0%}" for c, v in info["pool_category_share"].items()) +
              "; held-out: " + ", ".join(f"{c} {v:.0%}" for c, v in info["eval_category_share"].items() if v) + ".",
              ""]
    lv = [r["learner_vs_reference"] for r in payload["runs"] if r.get("learner_vs_reference")]
    if lv:
        lines += [f"Learner (`random`'s final model) vs reference, per-block losses over "
                  f"{lv[0]['blocks']} pool blocks, "
                  f"mean over seeds: Pearson r {statistics.fmean(x['pearson'] for x in lv):.2f}, sd "
                  f"{statistics.fmean(x['learner_sd'] for x in lv):.2f} (learner) vs "
                  f"{statistics.fmean(x['reference_sd'] for x in lv):.2f} (reference), mean "
                  f"{statistics.fmean(x['learner_mean'] for x in lv):.2f} vs "
                  f"{statistics.fmean(x['reference_mean'] for x in lv):.2f}.", ""]
    lines += ["## Final held-out loss and paired differences", "",
              "Δ: rule − `random` (or − `all`) in the same seed, mean and 95% Student-t interval over the seeds; "
              "won = seeds where the rule's loss is lower. Negative is better.", "",
              "| rule | held-out (mean) | Δ vs random [95% CI] | won | Δ vs all [95% CI] | code | prose |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vr, va = r.get("vs_random"), r.get("vs_all")
        won = f"{vr['won']}/{vr['n']}" if vr else "–"
        lines.append(f"| {r['rule']} | {r['final_mean']:.4f} | {_ci(vr)} | {won} | {_ci(va)} | "
                     f"{r.get('final_code', float('nan')):.3f} | {r.get('final_prose', float('nan')):.3f} |")
    lines += ["", "## Where the picks fall", "",
              "Share of the picks in each decile of the reference loss over the pool (d1 = lowest reference loss; a "
              "uniform pick puts 10% in each), by category, and the picks' mean rank among the S by the learner's "
              "own loss (1 = hardest; uniform: (S+1)/2) where the rule scans.", "",
              "| rule | " + " | ".join(f"d{i + 1}" for i in range(10)) + " | code | prose | noise | rank | "
              "learner loss picked / scanned |", "|---|" + "---:|" * 15]
    for r in rows:
        d = " | ".join(f"{x:.0%}" for x in r["picks_decile_share"])
        c = r["picks_category_share"]
        rank = f"{r['picks_mean_rank']:.1f}" if r["picks_mean_rank"] is not None else "–"
        ll = (f"{r['picks_learner_loss']:.3f} / {r['scanned_learner_loss']:.3f}"
              if r["picks_learner_loss"] is not None else "–")
        lines.append(f"| {r['rule']} | {d} | {c['code']:.0%} | {c['prose']:.0%} | {c['noise']:.0%} | {rank} | {ll} |")
    if any(r.get("pool_trained_share") is not None for r in rows):
        lines += ["", "## Coverage and scans", "",
                  "Per run, mean over seeds: no-grad scans at train time (the study's prototypes; – where "
                  "`CGGRModel` ran the rule), share of the picks that were blocks never trained before in the run, "
                  "share of the scanned candidates that were, and share of the pool trained at least once by the "
                  "end.", "", "| rule | scans per run | picks never trained | candidates never trained | "
                  "pool trained at least once |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r.get("pool_trained_share") is None:
                continue
            sc = f"{r['train_time_scans']:.0f}" if r.get("train_time_scans") is not None else "–"
            lines.append(f"| {r['rule']} | {sc} | {r['picks_unseen_share']:.1%} | {r['scanned_unseen_share']:.1%} | "
                         f"{r['pool_trained_share']:.1%} |")
    steps = [p["step"] for p in rows[0]["curve_mean"]]
    lines += ["", "## Held-out loss over the steps (mean over seeds)", "",
              "| rule | " + " | ".join(f"step {t}" for t in steps) + " |", "|---|" + "---:|" * len(steps)]
    for r in rows:
        lines.append(f"| {r['rule']} | " + " | ".join(f"{p['heldout']:.3f}" for p in r["curve_mean"]) + " |")
    lines += ["", "## Per seed", "", "| rule | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " |",
              "|---|" + "---:|" * len(s["seeds"])]
    for r in rows:
        lines.append(f"| {r['rule']} | " + " | ".join(f"{x:.4f}" for x in r["finals"]) + " |")
    lines += ["", "## Environment", "", f"- command: `{env['command']}`",
              f"- device: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"python {env['python']}, {env['utc']}",
              f"- wall time: {payload['wall_seconds'] / 60:.1f} min (one-off reference / pre-training included "
              "unless cached); mean seconds per run: "
              + ", ".join(f"{r['rule']} {r['seconds_mean']:.0f}" for r in rows), ""]
    return "\n".join(lines)


def combine(paths: list[str], out: Path, name: str) -> dict[str, Any]:
    """One rule x regime table from several regimes' JSON files: mean paired Δ vs random [95% CI], seeds won."""
    regimes = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    rules: list[str] = []
    for reg in regimes:
        rules += [r["rule"] for r in reg["summary"] if r["rule"] not in rules]
    cells = {}
    for reg in regimes:
        for r in reg["summary"]:
            cells[(r["rule"], reg["settings"]["regime"])] = r
    names = [reg["settings"]["regime"] for reg in regimes]
    lines = ["# Selection study: every rule x regime", "",
             "Final held-out loss of each rule minus `random`'s in the same seed: mean [95% Student-t interval] and "
             "seeds won; negative is better. `random` row: its mean held-out loss. Per-regime details: "
             + ", ".join(f"[{Path(p).stem}]({Path(p).stem}.md)" for p in paths) + ".", "",
             "| rule | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    table = {}
    for rule in rules:
        row = []
        for reg in names:
            c = cells.get((rule, reg))
            if c is None:
                row.append("–")
            elif rule == "random":
                row.append(f"{c['final_mean']:.3f}")
            else:
                v = c["vs_random"]
                row.append(f"{_ci(v)} {v['won']}/{v['n']}")
            table[f"{rule}|{reg}"] = c and {k: c.get(k) for k in ("final_mean", "vs_random", "vs_all")}
        lines.append(f"| {rule} | " + " | ".join(row) + " |")
    lines += ["", "Commands: " + "; ".join(f"`{reg['environment']['command']}`" for reg in regimes), ""]
    payload = {"regimes": names, "sources": paths, "cells": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return payload


def is_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def write_outputs(payload: dict[str, Any], out: Path, name: str) -> None:
    """``<out>/<name>.json`` and ``.md``, and the summary on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown(payload), encoding="utf-8")
    print()
    for r in payload["summary"]:
        vr = r.get("vs_random")
        print(f"{r['rule']:>15}: held-out {r['final_mean']:.4f}" + (f", vs random {_ci(vr)} won {vr['won']}/{vr['n']}"
                                                                     if vr else ""))
