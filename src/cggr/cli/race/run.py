"""The whole of ``cggr race``: settings checked, model resolved (``--router-layers`` checked before any data is
loaded), data loaded, model built, the reference trained (``--reference``), every arm of every replicate trained
and evaluated, the outputs written (:func:`cggr.cli.report.write_race_outputs`).

Every setup phase is announced before it starts and timed (:class:`cggr.cli.race.progress.RaceProgress`); each
arm run says which seed and arm of how many it is and how long the race still needs. Ctrl-C during a run writes the
runs that finished, marked partial, before the interrupt goes on to the caller.

Shape legend: B sequences per optimizer step of ``standard``; S = round(B · scan_multiplier) sequences scanned
per step by the selecting arms; k = max(1, round(ratio · S)) sequences (or tokens) they train on; N_train
training blocks.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cggr.cli.data import RaceData, cache_dir, load_arithmetic_data, load_text_data, pretrained_tokenizer
from cggr.cli.presets import ModelSpec, build_model, resolve_model
from cggr.cli.race.arms import (
    AA_DATA_SEED_OFFSET,
    HEAD_NAMES,
    autocast_context,
    resolve_head,
    uses_bf16,
    validate_config,
)
from cggr.cli.race.config import (
    COOLDOWN_FRACTION,
    WARMUP_FRACTION,
    RaceConfig,
    check_router_layers,
    demo_note,
    protocol_name,
    resolve_device,
    rungs_of,
    scan_multiplier,
)
from cggr.cli.race.context import RaceContext, RaceEnv
from cggr.cli.race.evaluate import probe_indices
from cggr.cli.race.progress import RaceProgress, format_duration
from cggr.cli.race.train import ArmResult, train_arm

REFERENCE_SEED_OFFSET = 7_919  # the reference model's init seed: --seed + this


def load_data(cfg: RaceConfig, spec: ModelSpec) -> RaceData:
    """Load ``cfg.data`` for the model ``spec`` (tokenised, split, cached). The held-out set has
    ``cfg.heldout_blocks`` blocks (at most ``cfg.heldout_cap`` per held-out file) or, for ``arithmetic``, that many
    held-out problems."""
    tokenizer = pretrained_tokenizer(spec.path) if spec.kind == "pretrained" else None
    vocab = spec.preset.vocab_size
    if cfg.data == "arithmetic":
        return load_arithmetic_data(vocab_size=vocab, eval_sequences=cfg.heldout_blocks, tokenizer=tokenizer,
                                    num_train=cfg.train_problems)
    seq_len = cfg.seq_len or spec.preset.seq_len
    return load_text_data(cfg.data, seq_len=seq_len, vocab_size=vocab, eval_sequences=cfg.heldout_blocks,
                          tokenizer=tokenizer, max_blocks_per_file=cfg.heldout_cap)


def prepare(cfg: RaceConfig) -> tuple[ModelSpec, RaceData]:
    """Resolve ``cfg.model`` and load ``cfg.data`` (:func:`load_data`): what every arm of a race shares."""
    spec = resolve_model(cfg.model)
    return spec, load_data(cfg, spec)


def data_phase(cfg: RaceConfig, spec: ModelSpec) -> str:
    """What the data phase of setup does, in words (logged before it starts: a first run trains a tokenizer)."""
    if spec.kind == "pretrained":
        tok = "the model's own tokenizer"
    else:
        slow = ", about a minute on 2 CPU cores" if cfg.data in ("code", "code+packages") else ""
        tok = (f"a {spec.preset.vocab_size}-token BPE tokenizer (trained on the first run with these data{slow}; "
               f"cached in {cache_dir()})")
    if cfg.data == "arithmetic":
        return f"generating {cfg.train_problems} arithmetic word problems, tokenising them with {tok}"
    what = {"code": "the .py files of Python's standard library",
            "code+packages": "the .py files of Python's standard library and installed packages"}.get(cfg.data,
                                                                                                     cfg.data)
    return f"reading {what}, tokenising them with {tok}"


def run_race(cfg: RaceConfig, *, log=print, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run every arm of ``cfg`` for every replicate and return the results (also written to ``cfg.out`` as JSON,
    Markdown and PNG; :func:`cggr.cli.report.race_summary` computes the intervals).

    ``clock``: the training clock (seconds), injectable so that tests can check the budget rule and the progress
    display's time left with a fake one. A ``KeyboardInterrupt`` during an arm run writes the runs that finished
    (``settings['partial']`` says where it stopped) and is raised again.
    """
    validate_config(cfg)
    device = resolve_device(cfg.device)
    t_setup = time.perf_counter()
    spec = resolve_model(cfg.model)
    router_layers = check_router_layers(cfg, spec)  # before the data: a first run's data load takes a minute
    preset = spec.preset
    minutes = cfg.minutes if cfg.minutes is not None else preset.minutes
    budget = minutes * 60.0
    progress = RaceProgress(seeds=cfg.seeds, arms=len(cfg.arms), budget=budget, bars=cfg.progress, log=log,
                            clock=clock, ladder_seconds=COOLDOWN_FRACTION * sum(cfg.ladder) * budget)
    with progress.phase("data", data_phase(cfg, spec)):
        data = load_data(cfg, spec)
    info = data.info
    log(f"data: {info.get('train_sequences')} training and {info.get('eval_sequences')} held-out blocks of "
        f"{info.get('seq_len')} tokens, " + ("read from the cache" if info.get("cache_hit") else "now cached")
        + f" ({info.get('cache')})")
    batch = cfg.batch_size or preset.batch_size
    multiplier = scan_multiplier(cfg)
    scan = max(1, round(batch * multiplier))
    kept = min(scan, max(1, math.floor(cfg.ratio * scan + 0.5)))  # sequences the selecting arms train on
    lr = cfg.lr or preset.lr
    vocab = None if spec.kind == "pretrained" else data.tokenizer.vocab_size
    data_seed0 = cfg.seed if cfg.data_seed is None else cfg.data_seed
    replicates = [(cfg.seed + i, data_seed0 + i) for i in range(cfg.seeds)]
    with progress.phase("model", f"building {spec.name} (init seed {replicates[0][0]})"):
        base = build_model(spec, vocab, seed=replicates[0][0])
    n_params = sum(p.numel() for p in base.parameters())
    fused = resolve_head(cfg.head, base, device)  # one head for every arm
    reference_info, reference = None, None
    if cfg.reference:  # before the arms: every arm then trains on the blocks the reference never saw
        with progress.phase("reference model", f"{cfg.reference_steps} steps on {cfg.reference_fraction:g} of the "
                            "training blocks, then scoring the others (one-off, on no arm's clock)"):
            data, reference, reference_info = _build_reference(cfg, spec, data, vocab, batch, lr, device, log,
                                                               on_step=progress.phase_step)
    on_device = device.type == "cuda"
    env = RaceEnv(train_ids=data.train_ids.to(device) if on_device else data.train_ids,
                  train_mask=data.train_mask.to(device) if on_device else data.train_mask, device=device,
                  clock=clock, max_chunk_seconds=min(1.0, 0.02 * budget),
                  has_padding=not bool(data.train_mask.all()))
    probe = probe_indices(data.eval_ids.shape[0], cfg.eval_sequences)
    sh = RaceContext(cfg=cfg, data=data, env=env, router_layers=router_layers, lr=lr, budget=budget, batch=batch,
                     scan=scan, fused=fused, eval_bs=max(batch, 16), probe=probe, progress=progress,
                     reference=reference.to(device) if reference is not None else None)
    setup_seconds = time.perf_counter() - t_setup
    protocol = protocol_name(cfg, multiplier)
    log(f"cggr race: {spec.name} ({n_params / 1e6:.1f}M parameters) on {data.info['origin']}, device {device}, "
        f"{minutes:g} min per arm, {cfg.seeds} seed(s), protocol {protocol}: standard batch {batch}, selecting "
        f"arms scan {scan} and train on {kept} (ratio {cfg.ratio}); LM head {HEAD_NAMES[fused]} in every arm; "
        f"held-out {data.eval_ids.shape[0]} blocks (probe {len(probe)})")
    demo = demo_note(spec.name, cfg.seeds)
    if demo:
        log(demo)
    settings = {
        "model": spec.name, "model_kind": spec.kind, "parameters": n_params, "data": cfg.data,
        "minutes_per_arm": minutes,
        "ratio": cfg.ratio, "protocol": protocol, "scan_multiplier": multiplier, "batch_size": batch,
        "scanned_per_step": scan, "trained_per_step": kept,
        "ratio_warmup_steps": cfg.ratio_warmup_steps, "scoring": cfg.scoring, "router_layers": router_layers,
        "num_layers": spec.num_layers, "lr": lr, "warmup_fraction": WARMUP_FRACTION,
        "cooldown_fraction": COOLDOWN_FRACTION, "ladder": list(rungs_of(cfg)),
        "schedule": (f"warm-up {WARMUP_FRACTION:.0%} / stable / linear decay over the last "
                     f"{COOLDOWN_FRACTION:.0%} of each arm's budget (by elapsed time)"),
        "seed": cfg.seed, "seeds": [s for s, _ in replicates], "data_seeds": [d for _, d in replicates],
        "aa_data_seed_offset": AA_DATA_SEED_OFFSET, "arms": list(cfg.arms),
        "head": "fused" if fused else "logits", "head_option": cfg.head,
        "device": str(device), "dtype": cfg.dtype,
        "precision": "bf16 autocast" if uses_bf16(device, cfg.dtype) else "fp32",
        "evals": cfg.evals, "probe_blocks": len(probe), "heldout_blocks": int(data.eval_ids.shape[0]),
        "heldout_cap": cfg.heldout_cap, "heldout_groups": list(data.eval_groups),
        "heldout_tokens": data.eval_mask[:, 1:].sum(-1).tolist(),
        "setup_seconds": round(setup_seconds, 1), "data_info": data.info,
    }
    if reference_info is not None:
        settings["reference"] = reference_info
    results: list[ArmResult] = []
    where = ""
    try:
        for seed_index, (init_seed, data_seed) in enumerate(replicates):
            if seed_index:
                where = f"building the model of seed {seed_index + 1} of {len(replicates)} (seed {init_seed})"
                base = build_model(spec, vocab, seed=init_seed)
            shift = init_seed % len(cfg.arms)  # the running order rotates with the seed
            order = list(cfg.arms[shift:]) + list(cfg.arms[:shift])
            initial: dict[str, dict[str, float]] = {}
            for pos, arm in enumerate(order):
                where = (f"arm {pos + 1} of {len(order)} ({arm}) of seed {seed_index + 1} of {len(replicates)} "
                         f"(seed {init_seed})")
                progress.start_arm(seed_index, pos, arm, init_seed)
                r = train_arm(arm, base, sh, init_seed=init_seed, data_seed=data_seed, order=pos, initial=initial,
                              log=log)
                progress.end_arm()
                _log_run(r, log)
                results.append(r)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:
        progress.close()
        if not results:
            raise
        settings["partial"] = {"interrupted_during": where, "finished_runs": len(results),
                               "planned_runs": len(replicates) * len(cfg.arms)}
        log(f"interrupted during {where}: writing the {len(results)} finished arm run(s), marked partial")
        _write(cfg, settings, results, device)
        raise
    finally:
        progress.close()
    return _write(cfg, settings, results, device)


def _log_run(r: ArmResult, log) -> None:
    """The line after an arm run (its held-out loss, steps, wall-clock time) and a warning if it overran."""
    se = r.heldout.get("se")
    log(f"  seed {r.seed} {r.arm:>11}: {r.steps} steps, held-out loss {r.heldout['loss']:.4f}"
        + (f" ± {se:.4f} (bootstrap SE)" if se else "")
        + (f", accuracy {r.curve[-1]['accuracy']:.1%}" if "accuracy" in r.curve[-1] else "")
        + f"; {r.train_seconds:.1f} s of training in {format_duration(r.wall_seconds)} of wall-clock time "
        "(warm-up, evaluations and the budget ladder's branches run with the clock stopped)")
    over = r.train_seconds - r.budget_seconds
    if over > 0:
        log(f"warning: {r.arm} (seed {r.seed}) trained {over:.3f} s past its {r.budget_seconds:g} s budget: its "
            "last step took longer than its recent ones (a busy machine?), and the steps past the budget count in "
            "its favour; marked on the plot")


def _write(cfg: RaceConfig, settings: dict[str, Any], results: list[ArmResult], device: torch.device
           ) -> dict[str, Any]:
    from cggr.cli.report import write_race_outputs
    from cggr.cli.timing import environment

    position = {a: i for i, a in enumerate(cfg.arms)}
    results = sorted(results, key=lambda r: (r.seed, position[r.arm]))
    env_info = environment(device, command=command_line())
    payload = {"settings": settings, "environment": env_info, "arms": [r.row() for r in results]}
    payload["paths"] = write_race_outputs(payload, Path(cfg.out), cfg.name, plot=cfg.plot)
    return payload


def _build_reference(cfg: RaceConfig, spec: ModelSpec, data: RaceData, vocab: int | None, batch: int, lr: float,
                     device: torch.device, log, on_step=None) -> tuple[RaceData, torch.Tensor, dict[str, Any]]:
    """``--reference``: train a fresh model of the race's architecture on ``reference_fraction`` of the training
    blocks (seeded split), score the other blocks with it, and return the race data restricted to those blocks
    (every arm trains on them, paired), their (N_train,) reference losses and the one-off cost (seconds)."""
    from cggr.cli.reference_model import build_reference

    model = build_model(spec, vocab, seed=cfg.seed + REFERENCE_SEED_OFFSET)
    rows, losses, info = build_reference(
        model, data.train_ids, data.train_mask, fraction=cfg.reference_fraction, steps=cfg.reference_steps,
        batch_size=batch, lr=lr, device=device, seed=cfg.seed + REFERENCE_SEED_OFFSET,
        autocast=lambda: autocast_context(device, cfg.dtype), max_blocks=cfg.reference_blocks, on_step=on_step,
    )
    del model
    info.update(fraction=cfg.reference_fraction, seed=cfg.seed + REFERENCE_SEED_OFFSET,
                train_seconds=round(info["train_seconds"], 2), score_seconds=round(info["score_seconds"], 2),
                total_seconds=round(info["total_seconds"], 2))
    log(f"reference model: {info['steps']} steps on {info['reference_blocks']} training blocks in "
        f"{info['train_seconds']:.1f} s, scored the other {info['train_blocks']} blocks in "
        f"{info['score_seconds']:.1f} s "
        f"(mean loss {info['mean_reference_loss']:.3f}; one-off, on no arm's clock); every arm trains on those "
        f"{info['train_blocks']} blocks")
    n_all = int(data.train_ids.shape[0])
    keys = data.train_keys  # per training row for arithmetic (its questions), per document for text corpora
    new_info = dict(data.info, train_sequences=int(rows.numel()), reference_sequences=n_all - int(rows.numel()))
    new = dataclasses.replace(
        data, train_ids=data.train_ids[rows], train_mask=data.train_mask[rows], info=new_info,
        train_keys=[keys[i] for i in rows.tolist()] if len(keys) == n_all else list(keys),
    )
    return new, losses.sequence(torch.arange(len(losses))), info


def command_line() -> str:
    """This process's command line, shell-quoted, with the program shown as ``cggr`` (recorded in the results)."""
    import shlex
    import sys

    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cggr", "__main__.py", "main.py"):
        argv[0] = "cggr"
    return " ".join(shlex.quote(a) for a in argv)



__all__ = ["REFERENCE_SEED_OFFSET", "command_line", "data_phase", "load_data", "prepare", "run_race"]
