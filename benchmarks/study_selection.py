"""Per-step selection study: which S-of-k sequences should a batch split train on?

Shape legend: S sequences scanned per step, k sequences trained on per step, T tokens per sequence, V vocabulary.

Every strategy starts from the same initial model (per seed), reads the same seeded sequence stream (the race's
:class:`cggr.cli.data.BatchStream`) and takes the same FIXED number of optimizer steps (AdamW as ``cggr race``,
lr by step: linear warm-up over 5%, cosine to 0). Each step scans S sequences and trains on k of them:

* ``random``: ``CGGRModel(selection='random')`` (the race's control: k of a random permutation).
* ``hardest-router``: ``CGGRModel(selection='topk')`` with the race's truncated router and scoring (what ``cggr``
  does: router = first layers + head, sequence score = mean token difficulty, top k).
* ``hardest-loss``: the full model's own per-sequence loss (no-grad forward over the S), top k: an oracle of
  difficulty. ``band-loss``: ranks S/4+1 .. S/4+k (skip the hardest 25%). ``middle-loss``: the k around the
  median. ``easiest-loss``: bottom k. These train on the chosen rows with the model's plain HF loss.

Every step also records the full model's per-sequence loss over all S (before the update), so each strategy's
chosen sequences can be placed in the pool: their mean loss and mean rank (1 = hardest). Held-out loss: the
race's :func:`cggr.cli.race.heldout_loss` on the race's held-out blocks.

Run (about 15 minutes on 2 CPU cores)::

    PYTHONPATH=src python benchmarks/study_selection.py            # tiny preset, code corpus, 150 steps, 3 seeds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cggr.cli.data import BatchStream, RaceData
from cggr.cli.presets import build_model
from cggr.cli.race import (
    Arm,
    RaceConfig,
    autocast_context,
    command_line,
    heldout_loss,
    lr_at,
    prepare,
    weights_digest,
)
from cggr.cli.timing import environment

STRATEGIES = ("random", "hardest-router", "hardest-loss", "band-loss", "middle-loss", "easiest-loss")
WRAPPED = {"random": "random", "hardest-router": "cggr"}  # strategy -> race arm (CGGRModel does the selection)


def rank_window(strategy: str, scan: int, kept: int) -> tuple[int, int]:
    """[start, stop) of the ranks (0 = highest loss) a loss-ranked strategy trains on."""
    start = {"hardest-loss": 0, "band-loss": scan // 4, "middle-loss": (scan - kept) // 2,
             "easiest-loss": scan - kept}[strategy]
    return start, start + kept


@torch.no_grad()
def per_sequence_loss(model, ids: torch.Tensor, mask: torch.Tensor, dtype: str) -> torch.Tensor:
    """(S,) mean next-token cross-entropy over each sequence's valid targets (NaN for a sequence without any).

    ``ids``/``mask``: (S, T); the target of position t is the token at t + 1, padding (mask False) ignored.
    """
    with autocast_context(ids.device, dtype):
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]  # (S, T-1, V)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (S, T-1)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (S, T-1)
    valid = mask[:, 1:].sum(-1)  # (S,)
    return (nll.sum(-1) / valid.clamp(min=1)).masked_fill(valid == 0, torch.nan)


def block_documents(data: RaceData) -> np.ndarray:
    """(N_train,) index into ``data.train_keys`` of the document each training block starts in.

    The training blocks cut the concatenation ``doc_0, EOS, doc_1, EOS, ...``, so the document of a token is the
    number of EOS ids before it (an EOS literal inside a file would shift this by one; none in the stdlib).
    """
    flat = data.train_ids.reshape(-1).numpy()
    eos_before = np.concatenate([[0], np.cumsum(flat == data.tokenizer.eos_id)[:-1]])
    return eos_before[:: data.seq_len]


def describe(data: RaceData, docs: np.ndarray, seq: int, loss: float) -> dict[str, Any]:
    """File and first characters of training block ``seq``."""
    text = data.tokenizer.decode(data.train_ids[seq].tolist())
    return {"sequence": int(seq), "loss": round(loss, 3), "file": data.train_keys[int(docs[seq])],
            "start": text[:80].replace("\n", "\\n")}


def run_strategy(strategy: str, base, data: RaceData, cfg: RaceConfig, *, steps: int, scan: int, kept: int,
                 router_layers: int, lr: float, eval_steps: list[int], device: torch.device,
                 docs: np.ndarray, snapshot_step: int | None) -> dict[str, Any]:
    """Train a copy of ``base`` for ``steps`` steps with one strategy; returns its curve and selection stats."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base).to(device)
    model.train()
    digest = weights_digest(model)
    runner = Arm(WRAPPED.get(strategy, "standard"), model, cfg, router_layers, lr, device, fused_head=False)
    stream = BatchStream(data.train_ids.shape[0], cfg.seed)
    eval_bs = 16
    curve, chosen_loss, pool_loss, chosen_rank, train_loss = [], [], [], [], []
    snapshot: dict[str, Any] | None = None
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step in eval_steps:
            curve.append({"step": step, "heldout_loss": heldout_loss(model, data, device, cfg.dtype, eval_bs)})
        if step == steps:
            break
        idx = stream.take(scan)  # (S,)
        ids, mask = data.train_ids[idx].to(device), data.train_mask[idx].to(device)  # (S, T)
        pool = per_sequence_loss(model, ids, mask, cfg.dtype)  # (S,) before this step's update
        order = torch.argsort(pool, descending=True)  # rank 0 = hardest
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(scan, device=order.device)
        step_lr = lr_at(step / steps, lr)
        if strategy in WRAPPED:
            loss, _, _ = runner.step(ids, mask, step_lr, count=False)
            chosen = torch.tensor(runner.wrapper.get_metrics()["selected_indices"], device=device)  # (k,)
        else:
            lo, hi = rank_window(strategy, scan, kept)
            chosen = order[lo:hi]  # (k,)
            loss, _, _ = runner.step(ids[chosen], mask[chosen], step_lr, count=False)
        chosen_loss.append(float(pool[chosen].mean()))
        pool_loss.append(float(pool.mean()))
        chosen_rank.append(float(ranks[chosen].float().mean()) + 1.0)
        train_loss.append(float(loss.detach()))
        if step == snapshot_step:
            snapshot = {
                "step": step,
                "chosen": [describe(data, docs, int(idx[i]), float(pool[i])) for i in chosen.tolist()],
                "pool_hardest": [describe(data, docs, int(idx[i]), float(pool[i])) for i in order[:4].tolist()],
                "pool_easiest": [describe(data, docs, int(idx[i]), float(pool[i])) for i in order[-4:].tolist()],
            }
        if not math.isfinite(train_loss[-1]):
            raise RuntimeError(f"{strategy} seed {cfg.seed}: training loss {train_loss[-1]} at step {step}")
    return {
        "strategy": strategy, "seed": cfg.seed, "init_digest": digest, "seconds": round(time.perf_counter() - t0, 1),
        "final_heldout_loss": curve[-1]["heldout_loss"], "curve": curve,
        "chosen_loss": chosen_loss, "pool_loss": pool_loss, "chosen_rank": chosen_rank, "train_loss": train_loss,
        "snapshot": snapshot, "model": model,
    }


@torch.no_grad()
def characterise(model, data: RaceData, docs: np.ndarray, cfg: RaceConfig, device: torch.device, *,
                 count: int, show: int = 8) -> dict[str, Any]:
    """Score ``count`` evenly spaced training blocks with ``model``; the hardest and easiest, and test-file shares."""
    seqs = torch.linspace(0, data.train_ids.shape[0] - 1, count).round().long()  # (count,)
    losses = torch.cat([
        per_sequence_loss(model, data.train_ids[s].to(device), data.train_mask[s].to(device), cfg.dtype).cpu()
        for s in seqs.split(64)
    ])  # (count,)
    order = torch.argsort(losses, descending=True)
    files = [data.train_keys[int(docs[s])] for s in seqs.tolist()]
    is_test = np.array(["test" in f.split("/")[0] or "/test" in f for f in files])
    quarter = max(1, count // 4)

    def share(rows: torch.Tensor) -> float:
        return round(float(is_test[rows.numpy()].mean()), 3)

    return {
        "blocks": count, "mean_loss": round(float(losses.mean()), 3),
        "test_file_share": {"all": share(order), "hardest_quarter": share(order[:quarter]),
                            "easiest_quarter": share(order[-quarter:])},
        "hardest": [describe(data, docs, int(seqs[i]), float(losses[i])) for i in order[:show].tolist()],
        "easiest": [describe(data, docs, int(seqs[i]), float(losses[i])) for i in order[-show:].tolist()],
    }


def summarise(runs: list[dict[str, Any]], strategies: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per strategy: final held-out loss over seeds, its paired difference to ``random`` (same seed), the curve
    and the selection statistics."""
    reference = {r["seed"]: r["final_heldout_loss"] for r in runs if r["strategy"] == "random"}
    rows = []
    for strategy in strategies:
        mine = [r for r in runs if r["strategy"] == strategy]
        finals = [r["final_heldout_loss"] for r in mine]
        deltas = [r["final_heldout_loss"] - reference[r["seed"]] for r in mine if r["seed"] in reference]
        curve = [{"step": p["step"], "heldout_loss": statistics.fmean(r["curve"][i]["heldout_loss"] for r in mine)}
                 for i, p in enumerate(mine[0]["curve"])]
        rows.append({
            "strategy": strategy, "seeds": [r["seed"] for r in mine], "final_mean": statistics.fmean(finals),
            "final_min": min(finals), "final_max": max(finals), "finals": finals,
            "delta_vs_random": deltas, "delta_mean": statistics.fmean(deltas) if deltas else None,
            "chosen_loss": statistics.fmean(x for r in mine for x in r["chosen_loss"]),
            "pool_loss": statistics.fmean(x for r in mine for x in r["pool_loss"]),
            "chosen_rank": statistics.fmean(x for r in mine for x in r["chosen_rank"]),
            "train_loss_last10": statistics.fmean(x for r in mine for x in r["train_loss"][-10:]),
            "curve_mean": curve,
        })
    return rows


def markdown(payload: dict[str, Any]) -> str:
    s, env, rows = payload["settings"], payload["environment"], payload["summary"]
    lines = [
        "# Selection study: which sequences should a batch split train on?", "",
        f"`{s['model']}` preset ({s['parameters'] / 1e6:.1f}M parameters), `{s['data']}` corpus, {s['steps']} "
        f"optimizer steps per run, each scanning S={s['scan']} sequences of T={s['seq_len']} and training on "
        f"k={s['kept']}; AdamW peak lr {s['lr']}, linear warm-up 5% then cosine to 0 by step; seeds {s['seeds']} "
        "(same seed = same initial weights and same sequence stream for every strategy). Held-out loss: "
        f"`cggr.cli.race.heldout_loss` on {s['eval_sequences']} held-out blocks.", "",
        "| strategy | final held-out loss (mean) | min .. max over seeds | Δ vs random, same seed: mean (per seed) "
        "| loss of the chosen "
        "sequences | pool mean loss | mean rank of chosen (1 = hardest of S) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if r["delta_mean"] is None else (
            f"{r['delta_mean']:+.3f} (" + ", ".join(f"{d:+.3f}" for d in r["delta_vs_random"]) + ")")
        lines.append(f"| {r['strategy']} | {r['final_mean']:.3f} | {r['final_min']:.3f} .. {r['final_max']:.3f} | "
                     f"{delta} | {r['chosen_loss']:.3f} | {r['pool_loss']:.3f} | {r['chosen_rank']:.1f} |")
    lines += ["", "Loss of the chosen sequences / pool mean: the full model's per-sequence loss just before the "
              "step, averaged over steps and seeds (rank by the same loss).", "", "## Held-out loss curve (mean over "
              "seeds)", ""]
    steps = [p["step"] for p in rows[0]["curve_mean"]]
    lines += ["| strategy | " + " | ".join(f"step {t}" for t in steps) + " |", "|---|" + "---:|" * len(steps)]
    for r in rows:
        lines.append(f"| {r['strategy']} | " + " | ".join(f"{p['heldout_loss']:.3f}" for p in r["curve_mean"]) + " |")
    if payload.get("reading"):
        lines += ["", "## Reading", "", payload["reading"]]
    char = payload.get("characterisation")
    if char:
        t = char["test_file_share"]
        lines += ["", f"## What the hardest sequences are ({char['model']})", "",
                  f"{char['blocks']} evenly spaced training blocks scored; share of blocks starting in a test file: "
                  f"all {t['all']:.0%}, hardest quarter {t['hardest_quarter']:.0%}, easiest quarter "
                  f"{t['easiest_quarter']:.0%}.", "", "| | loss | file | first characters |", "|---|---:|---|---|"]
        for side in ("hardest", "easiest"):
            for d in char[side]:
                start = d["start"].replace("|", "\\|").replace("`", "'")
                lines.append(f"| {side} | {d['loss']:.2f} | `{d['file']}` | `{start[:60]}` |")
    lines += ["", "## Environment", "", f"- command: `{env['command']}`",
              f"- device: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"python {env['python']}, {env['utc']}", f"- wall time: {payload['wall_seconds'] / 60:.1f} min", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--data", default="code")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--scan", type=int, default=32, help="S: sequences scanned per step")
    p.add_argument("--kept", type=int, default=8, help="k: sequences trained on per step")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--evals", type=int, default=8)
    p.add_argument("--characterise", type=int, default=1024, help="training blocks scored at the end (0: none)")
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--name", default="selection_study")
    p.add_argument("--reading", default="", help="a paragraph (or @file) reading the results, put in the outputs")
    p.add_argument("--rerender", default="", help="rewrite the outputs of this JSON (summary, --reading) and exit")
    args = p.parse_args(argv)
    if args.rerender:
        payload = json.loads(Path(args.rerender).read_text(encoding="utf-8"))
        payload["summary"] = summarise(payload["runs"], tuple(payload["settings"]["strategies"]))
        if args.reading:
            payload["reading"] = _read_text(args.reading)
        write_outputs(payload, Path(args.rerender).parent, Path(args.rerender).stem)
        return payload
    if not (1 <= args.kept <= args.scan) or args.steps < 1:
        raise SystemExit(f"need 1 <= --kept <= --scan and --steps >= 1, got {args.kept}, {args.scan}, {args.steps}")
    t_start = time.perf_counter()
    device = torch.device("cpu")
    cfg0 = RaceConfig(model=args.model, data=args.data, ratio=args.kept / args.scan, device="cpu")
    spec, data = prepare(cfg0)
    router_layers, lr = spec.preset.router_layers, spec.preset.lr
    docs = block_documents(data)
    eval_steps = sorted({round(i * args.steps / args.evals) for i in range(args.evals + 1)})
    runs: list[dict[str, Any]] = []
    char = None
    for seed in args.seeds:
        cfg = dataclasses.replace(cfg0, seed=seed)
        base = build_model(spec, data.tokenizer.vocab_size, seed=seed)
        for strategy in args.strategies:
            run = run_strategy(strategy, base, data, cfg, steps=args.steps, scan=args.scan, kept=args.kept,
                               router_layers=router_layers, lr=lr, eval_steps=eval_steps, device=device, docs=docs,
                               snapshot_step=args.steps // 2 if seed == args.seeds[0] else None)
            model = run.pop("model")
            if seed == args.seeds[0] and strategy == "random" and args.characterise:
                char = {"model": f"the random strategy's final model, seed {seed}",
                        **characterise(model, data, docs, cfg, device, count=args.characterise)}
            runs.append(run)
            print(f"seed {seed} {strategy:>15}: held-out {run['final_heldout_loss']:.4f}, chosen loss "
                  f"{statistics.fmean(run['chosen_loss']):.3f} (pool {statistics.fmean(run['pool_loss']):.3f}), "
                  f"rank {statistics.fmean(run['chosen_rank']):.1f}, {run['seconds']:.0f} s", flush=True)
    reading = _read_text(args.reading)
    payload = {
        "settings": {"model": spec.name, "parameters": sum(p.numel() for p in base.parameters()), "data": args.data,
                     "steps": args.steps, "scan": args.scan, "kept": args.kept, "seeds": args.seeds,
                     "seq_len": data.seq_len, "lr": lr, "warmup_fraction": 0.05, "router_layers": router_layers,
                     "router_scoring": cfg0.scoring, "eval_steps": eval_steps,
                     "eval_sequences": int(data.eval_ids.shape[0]), "strategies": args.strategies,
                     "data_info": {k: v for k, v in data.info.items() if k != "cache"}},
        "environment": environment(device, command=command_line()),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "summary": summarise(runs, tuple(args.strategies)),
        "reading": reading,
        "characterisation": char,
        "runs": runs,
    }
    write_outputs(payload, Path(args.out), args.name)
    return payload


def _read_text(value: str) -> str:
    """``value``, or the contents of the file ``value[1:]`` when it starts with ``@``."""
    return Path(value[1:]).read_text(encoding="utf-8").strip() if value.startswith("@") else value


def write_outputs(payload: dict[str, Any], out: Path, name: str) -> None:
    """``<out>/<name>.json`` and ``.md``, and the summary table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown(payload), encoding="utf-8")
    print()
    for r in payload["summary"]:
        delta = "" if r["delta_mean"] is None else f", vs random {r['delta_mean']:+.4f}"
        print(f"{r['strategy']:>15}: final held-out {r['final_mean']:.4f} ({r['final_min']:.4f} .. "
              f"{r['final_max']:.4f}){delta}, chosen loss {r['chosen_loss']:.3f}, rank {r['chosen_rank']:.1f}")


if __name__ == "__main__":
    main()
