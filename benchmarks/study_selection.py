"""Equal-steps selection study: which k of S scanned sequences should a batch split train on, and when does it pay?

Shape legend: S sequences scanned per step, k sequences trained on per step, T tokens per sequence, V vocabulary,
P blocks in the training pool.

Every rule takes the same FIXED number of optimizer steps from the same initial weights (per seed) and reads the
same seeded stream of S sequences per step (the race's :class:`cggr.cli.data.BatchStream` over the pool); only
the choice of k of the S differs. So the study measures which sequences are worth a step, without the scan's
cost (a race measures that). Paired seeds: seed s fixes the initial weights (from scratch) and the stream order
for every rule; deltas to ``random`` are taken within a seed and summarised with a 95% interval over seeds.

Data (the race's corpus, tokenizer and held-out split): the training blocks are split BY DOCUMENT into two
halves. The rules train on a fixed pool of P blocks drawn from half A; the reference model trains on half B
(never on held-out data, never on a block the rules train on). The held-out loss is measured on held-out
documents only (the race's split).

Regimes (``--regime``; each a hypothesis about where selection can pay, see docs/selection_study.md):

* ``clean``: from scratch, each pool block seen once per run (P = steps x S).
* ``noise``: as ``clean`` with 25% of the pool's and of half B's blocks replaced by noise (half uniform random
  tokens, half the block's own tokens shuffled); held-out data stays clean.
* ``repeat``: from scratch, a pool of steps x S / 4 blocks read for 4 epochs.
* ``finetune``: continue from a model pre-trained inside the study on another corpus (installed packages'
  ``.py`` files, tokenised with the same tokenizer), train on the standard library.
* ``late``: continue from a model pre-trained on other half-A blocks of the same corpus (the later phase of a
  longer run: a new warm-up + cosine over the study's steps).

Rules (``--rules``): ``random`` (k uniformly), ``all`` (train on all S: 4x the compute), ``hardest`` (top k by the
learner's loss), ``reducible`` (top k by learner loss - reference loss: RHO-LOSS), ``reducible-norm`` (top k by
z(learner) - z(reference), each standardised over the S), ``reducible-rank`` (the same with percentile ranks),
``sampled-t<τ>`` (Gumbel-top-k over the ``reducible-norm`` score / τ: τ -> 0 is ``reducible-norm``, τ -> inf is
``random``), ``ref-filter`` / ``ref-filter-q<share>`` (drop the S/8, or that share, of highest reference losses,
then k uniformly: no scan at train time), ``ref-low`` (the k lowest reference losses), ``importance`` (k distinct,
inclusion probability ∝ the learner's loss mixed ½ with uniform, weights 1/π: unbiased) and ``importance-bound``
(k draws with replacement, p = ½ ‖softmax − onehot‖-bound share + ½ uniform, weights 1/(S·p)).

Stale rules (no scan: a step costs what a ``random`` step costs, so equal steps is equal wall-clock): each run keeps
a (P,) table of the learner's last training loss per pool block (the mean next-token loss of the block in the
training forward of the step that last trained it, detached; +inf for blocks never trained), updated after every
step for the k trained blocks only. Every stale rule takes the never-trained candidates first, ties broken
uniformly at random with the run's seeded generator; they differ on the seen candidates: ``unseen-first`` (then
uniformly at random: the coverage control), ``stale-hardest`` (then by stale loss, highest first),
``stale-reducible-norm`` (then top k by z(stale loss) − z(reference loss), z over the seen candidates of the step)
and ``stale-sampled-t<τ>`` (then Gumbel-top-k over that score / τ). In a regime where every block is scanned once
(``clean``) no candidate has been trained, so they choose k uniformly, as ``random`` does (the very same picks as
the study's own ``random`` prototype, ``--impl study``; ``CGGRModel``'s ``random`` draws from its own generator).
With ``--impl
library`` (default) the rules that :class:`cggr.CGGRModel` offers run through it, with the learner itself as the
router; the others (and all with ``--impl study``) are plain-torch prototypes here, whose top-k choices are
checked against the library's at every step. The learner's losses come from a no-grad forward of the full
learner over the S before the step (an oracle scan: a truncated router would be cheaper and worse).

Outputs: ``benchmarks/results/cpu/selection_<regime>.json`` / ``.md`` (settings, command, versions, every run);
``--combine A.json B.json ...`` writes the rule x regime table (``selection_regimes.md``).

Run one regime (15-35 minutes on 2 shared CPU cores; the commands of the committed results are in their files)::

    PYTHONPATH=src python benchmarks/study_selection.py --regime finetune --steps 60 --pool 3200
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _study_report import CATEGORIES, combine, is_float, summarise, write_outputs
from _study_rules import (
    STALE_RULES,
    CapturingRouter,
    choose,
    choose_stale,
    is_stale,
    library_settings,
    logits_losses,
    make_optimizer,
    needs_scan,
    scan,
    train_plain,
    train_step,
    update_stale,
)
from cggr.cli.data import BatchStream, RaceData, package_dirs
from cggr.cli.presets import build_model
from cggr.cli.race import RaceConfig, command_line, lr_at, prepare, weights_digest
from cggr.cli.timing import environment

REGIMES = ("clean", "noise", "repeat", "finetune", "late")
BASE_RULES = ("random", "all", "hardest", "reducible", "reducible-norm", "reducible-rank", "ref-filter", "ref-low",
              "importance", "importance-bound", *STALE_RULES)
PARAMETRIC_RULES = ("sampled-t", "stale-sampled-t", "ref-filter-q")  # prefix + a positive number
DEFAULT_RULES = ("random", "hardest", "reducible", "reducible-norm", "sampled-t1", "ref-filter", "importance")
CACHE = Path("/tmp/cggr-study-cache")


# ------------------------------------------------------------------------------------------------ data
def block_documents(flat_ids: np.ndarray, eos_id: int, seq_len: int) -> np.ndarray:
    """(N,) index of the document each block of ``flat_ids`` (documents joined by EOS, cut every T) starts in."""
    eos_before = np.concatenate([[0], np.cumsum(flat_ids == eos_id)[:-1]])
    return eos_before[::seq_len][: len(flat_ids) // seq_len]


_PROSE_WORD = re.compile(r"[A-Za-z]{2,}")


def is_prose(text: str) -> bool:
    """Natural-language text (docstrings, comments, licences) rather than code: most non-space characters are
    letters inside words and at most one in 25 is a code symbol."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    letters = sum(len(w) for w in _PROSE_WORD.findall(text))
    symbols = sum(c in "()[]{}=_<>+*/%@|&^~\\;" for c in chars)
    return letters / len(chars) > 0.8 and symbols / len(chars) < 0.04


def noise_blocks(blocks: torch.Tensor, share: float, vocab: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Replace ``share`` of the rows of (n, T) ``blocks``: half of them by uniform random tokens, half by a
    permutation of their own tokens. Returns (new blocks, (n,) bool mask of the replaced rows)."""
    g = torch.Generator().manual_seed(seed)
    n, t = blocks.shape
    rows = torch.randperm(n, generator=g)[: round(share * n)]
    out = blocks.clone()
    half = len(rows) // 2
    out[rows[:half]] = torch.randint(0, vocab, (half, t), generator=g)
    for r in rows[half:].tolist():
        out[r] = blocks[r][torch.randperm(t, generator=g)]
    mask = np.zeros(n, dtype=bool)
    mask[rows.numpy()] = True
    return out, mask


def package_blocks(data: RaceData, *, max_chars: int, seq_len: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Installed packages' ``.py`` files (every n-th file so that ~``max_chars`` characters are read), tokenised
    with the race corpus's tokenizer and cut into (n, T) blocks: the other corpus of the ``finetune`` regime."""
    files = []
    for root in package_dirs():
        files += [p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts]
    sizes = [p.stat().st_size for p in files]
    stride = max(1, round(sum(sizes) / max_chars))
    texts = []
    for p in files[::stride]:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    flat = []
    for ids in data.tokenizer.encode(texts):
        flat += [*ids, data.tokenizer.eos_id]
    n = len(flat) // seq_len
    blocks = torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return blocks, {"files": len(texts), "of_files": len(files), "characters": sum(map(len, texts)),
                    "blocks": n, "folders": [str(r) for r in package_dirs()]}


# ------------------------------------------------------------------------------------------------ setup
@dataclasses.dataclass
class Setup:
    data: RaceData
    spec: Any
    pool: torch.Tensor  # (P, T) the blocks the rules train on
    pool_category: np.ndarray  # (P,) index into CATEGORIES
    ref_loss: torch.Tensor  # (P,) cached reference loss per pool block
    ref_decile: np.ndarray  # (P,) 0..9 decile of the reference loss over the pool
    eval_ids: torch.Tensor
    eval_category: np.ndarray
    init_state: dict | None  # pre-trained weights (finetune / late) or None (from scratch, per seed)
    info: dict[str, Any]


def model_spec(args, vocab: int):
    spec, _ = _prepare_cached(args)
    cfg = spec.config.__class__.from_dict(spec.config.to_dict())
    cfg.hidden_size, cfg.intermediate_size = args.hidden, args.intermediate
    cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads = args.layers, args.heads, args.kv_heads
    return dataclasses.replace(spec, config=cfg)


_PREPARED: dict[tuple, Any] = {}


def _prepare_cached(args):
    key = (args.data, args.seq_len, args.eval_sequences)
    if key not in _PREPARED:
        _PREPARED[key] = prepare(RaceConfig(model="tiny", data=args.data, seq_len=args.seq_len,
                                             eval_sequences=args.eval_sequences, device="cpu"))
    return _PREPARED[key]


def categorise(data: RaceData, blocks: torch.Tensor) -> np.ndarray:
    return np.array([CATEGORIES.index("prose" if is_prose(data.tokenizer.decode(b.tolist())) else "code")
                     for b in blocks])


def cached(name: str, key: dict[str, Any], build):
    """``build()``'s result, cached under CACHE by a hash of ``key`` (so that regimes share their one-off work)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{digest}.pt"
    if path.is_file():
        out = torch.load(path, weights_only=False)
        out["info"]["cache_hit"] = True
        return out
    out = build()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    out["info"]["cache_hit"] = False
    return out


def build_setup(args, log) -> Setup:
    _, data = _prepare_cached(args)
    spec = model_spec(args, data.tokenizer.vocab_size)
    vocab = data.tokenizer.vocab_size
    flat = data.train_ids.reshape(-1).numpy()
    docs = block_documents(flat, data.tokenizer.eos_id, data.seq_len)  # (N_train,)
    half_b = np.array([int(hashlib.sha256(data.train_keys[d].encode()).hexdigest(), 16) % 2 == 1 for d in docs])
    a_rows, b_rows = np.flatnonzero(~half_b), np.flatnonzero(half_b)
    g = np.random.default_rng(1234)
    a_perm = g.permutation(a_rows)
    pool_size = args.pool or args.steps * args.scan // args.epochs
    pool_rows, rest_rows = a_perm[:pool_size], a_perm[pool_size:]
    pool = data.train_ids[torch.from_numpy(pool_rows)]
    ref_blocks = data.train_ids[torch.from_numpy(b_rows)]
    pool_category = categorise(data, pool)
    if args.noise > 0:
        pool, pool_noise = noise_blocks(pool, args.noise, vocab, seed=11)
        ref_blocks, _ = noise_blocks(ref_blocks, args.noise, vocab, seed=12)
        pool_category[pool_noise] = CATEGORIES.index("noise")
    eval_ids = data.eval_ids
    eval_category = categorise(data, eval_ids)
    info: dict[str, Any] = {"half_a_blocks": len(a_rows), "half_b_blocks": len(b_rows), "pool_blocks": pool_size,
                            "pool_category_share": {c: float((pool_category == i).mean())
                                                    for i, c in enumerate(CATEGORIES)},
                            "eval_blocks": int(eval_ids.shape[0]),
                            "eval_category_share": {c: float((eval_category == i).mean())
                                                    for i, c in enumerate(CATEGORIES)}}
    base_key = {"data": data.info["cache"], "seq_len": data.seq_len, "model": spec.config.to_dict(), "v": 1}

    init_state = None
    if args.init != "scratch":
        corpus, steps = args.init.split(":")

        def pretrain():
            if corpus == "packages":
                blocks, corpus_info = package_blocks(data, max_chars=args.package_chars, seq_len=data.seq_len)
            elif corpus == "stdlib":
                blocks, corpus_info = data.train_ids[torch.from_numpy(rest_rows)], {"blocks": len(rest_rows)}
            else:
                raise SystemExit(f"--init: unknown corpus {corpus!r} (packages or stdlib)")
            model = build_model(spec, vocab, seed=999)
            seconds, cpu = train_plain(model, blocks, steps=int(steps), batch=args.init_batch, lr=args.init_lr,
                                       seed=999)
            model.eval()
            held = float(scan(model, eval_ids)[0].mean())
            return {"state": model.state_dict(),
                    "info": {"corpus": corpus, "steps": int(steps), "batch": args.init_batch, "lr": args.init_lr,
                             "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
                             "heldout_loss": held, **corpus_info}}

        pre = cached("init", {**base_key, "init": args.init, "batch": args.init_batch, "lr": args.init_lr,
                              "chars": args.package_chars, "pool": pool_size}, pretrain)
        init_state = pre["state"]
        info["init"] = pre["info"]
        log(f"init: pre-trained on {corpus} for {steps} steps: held-out {pre['info']['heldout_loss']:.3f} "
            f"({pre['info']['train_seconds']:.0f} s{', cached' if pre['info']['cache_hit'] else ''})")

    def reference_model():
        model = build_model(spec, vocab, seed=1000)
        if init_state is not None:
            model.load_state_dict(init_state)
        seconds, cpu = train_plain(model, ref_blocks, steps=args.ref_steps, batch=args.ref_batch, lr=args.ref_lr,
                                   seed=1000)
        model.eval()
        held = float(scan(model, eval_ids)[0].mean())
        return {"state": model.state_dict(),
                "info": {"steps": args.ref_steps, "batch": args.ref_batch, "lr": args.ref_lr,
                         "trained_on": "half B of the training documents" + (" with noise" if args.noise else ""),
                         "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
                         "heldout_loss": held}}

    ref_key = {**base_key, "init": args.init, "noise": args.noise, "steps": args.ref_steps, "batch": args.ref_batch,
               "lr": args.ref_lr, "init_batch": args.init_batch, "init_lr": args.init_lr}
    ref_model = cached("refmodel", ref_key, reference_model)

    def reference_scores():
        model = build_model(spec, vocab, seed=1000)
        model.load_state_dict(ref_model["state"])
        model.eval()
        t0, c0 = time.perf_counter(), time.process_time()
        ref_loss = scan(model, pool)[0]
        return {"ref_loss": ref_loss, "info": {"score_seconds": round(time.perf_counter() - t0, 1),
                                               "score_cpu_seconds": round(time.process_time() - c0, 1),
                                               "scored_blocks": pool_size}}

    scores = cached("refscores", {**ref_key, "pool": pool_size}, reference_scores)
    ref = {"ref_loss": scores["ref_loss"],
           "info": {**ref_model["info"], **scores["info"],
                    "cache_hit": ref_model["info"]["cache_hit"] and scores["info"]["cache_hit"]}}
    info["reference"] = ref["info"]
    log(f"reference: {args.ref_steps} steps x {args.ref_batch} on half B: held-out {ref['info']['heldout_loss']:.3f}, "
        f"train {ref['info']['train_seconds']:.0f} s + scoring {pool_size} blocks {ref['info']['score_seconds']:.0f} s"
        + (" (cached)" if ref["info"]["cache_hit"] else ""))
    ref_loss = ref["ref_loss"]
    edges = np.quantile(ref_loss.numpy(), np.linspace(0, 1, 11)[1:-1])
    ref_decile = np.searchsorted(edges, ref_loss.numpy(), side="right")
    return Setup(data, spec, pool, pool_category, ref_loss, ref_decile, eval_ids, eval_category, init_state, info)


# ------------------------------------------------------------------------------------------------ one run
def heldout(model, setup: Setup) -> dict[str, float]:
    """Held-out loss (mean over the held-out blocks, all full: = token-weighted) and per category."""
    was = model.training
    model.eval()
    losses = scan(model, setup.eval_ids)[0].numpy()
    model.train(was)
    out = {"all": float(losses.mean())}
    for i, c in enumerate(CATEGORIES):
        if (setup.eval_category == i).any():
            out[c] = float(losses[setup.eval_category == i].mean())
    return out


def run_rule(rule: str, setup: Setup, args, seed: int, eval_steps: list[int], initial: dict) -> dict[str, Any]:
    model = build_model(setup.spec, setup.data.tokenizer.vocab_size, seed=seed)
    if setup.init_state is not None:
        model.load_state_dict(setup.init_state)
    model.train()
    digest = weights_digest(model)
    opt = make_optimizer(model, args.lr)
    stream = BatchStream(setup.pool.shape[0], seed)
    g = torch.Generator().manual_seed(seed * 1000 + 7)
    settings = library_settings(rule) if args.impl == "library" else None
    wrapper = router = None
    if settings is not None:
        from cggr import CGGRModel

        router = CapturingRouter(model)
        wrapper = CGGRModel(model, router=router, min_tokens_ratio=args.kept / args.scan, warmup_steps=0,
                            seed=seed * 1000 + 7, fused_head=False, **settings)
        wrapper.train()
    agree, compared = 0, 0
    curve = [{"step": 0, **initial}]
    picks_decile = np.zeros(10)
    picks_category = np.zeros(len(CATEGORIES))
    pool_category = np.zeros(len(CATEGORIES))
    rank_sum, rank_n, picked_loss, pool_loss = 0.0, 0, [], []
    unique_weight, t0, c0 = [], time.perf_counter(), time.process_time()
    stale = torch.full((setup.pool.shape[0],), math.inf) if is_stale(rule) else None  # (P,) last training loss
    trained = np.zeros(setup.pool.shape[0], dtype=bool)  # (P,) blocks trained at least once
    scans = unseen_picked = unseen_scanned = picked = 0
    for step in range(args.steps):
        idx = stream.take(args.scan)  # (S,) pool positions
        ids = setup.pool[idx]  # (S, T)
        ref = setup.ref_loss[idx]  # (S,)
        loss = bound = None
        if wrapper is not None:  # the library: CGGRModel scans (router = the learner), selects, weights
            router.logits = None
            for group in opt.param_groups:
                group["lr"] = lr_at(step / args.steps, args.lr)
            out = wrapper(ids, labels=ids, reference_loss=ref if settings.get("scoring") == "reducible" else None).loss
            out.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            wrapper.step()
            train_loss = float(out.detach())
            rows = torch.tensor(wrapper.get_metrics()["selected_indices"])
            if router.logits is not None:
                loss = logits_losses(router.logits, ids)
                if settings["selection"] == "topk":  # the study's prototype must pick the same set
                    mine, _ = choose(rule, args.kept, loss, None, ref, g)
                    agree += set(mine.tolist()) == set(rows.tolist())
                    compared += 1
        else:
            if needs_scan(rule):
                loss, bound = scan(model, ids, bound=rule == "importance-bound")
                scans += 1
            if stale is not None:  # no forward: the table holds the training losses of earlier steps
                rows, weights = choose_stale(rule, args.kept, stale[idx], ref, g), None
            else:
                rows, weights = choose(rule, args.kept, loss, bound, ref, g)
            train_loss, per_seq = train_step(model, opt, ids[rows], lr_at(step / args.steps, args.lr),
                                             None if weights is None else weights.float())
            if stale is not None:
                update_stale(stale, idx, rows, per_seq)
        if not math.isfinite(train_loss):
            raise RuntimeError(f"{rule} seed {seed}: training loss {train_loss} at step {step}")
        chosen = idx[rows].numpy()
        unseen_picked += int((~trained[chosen]).sum())
        picked += len(chosen)
        unseen_scanned += int((~trained[idx.numpy()]).sum())
        trained[chosen] = True
        picks_decile += np.bincount(setup.ref_decile[chosen], minlength=10)
        picks_category += np.bincount(setup.pool_category[chosen], minlength=len(CATEGORIES))
        pool_category += np.bincount(setup.pool_category[idx.numpy()], minlength=len(CATEGORIES))
        if loss is not None:
            order = torch.argsort(loss, descending=True)
            ranks = torch.empty_like(order)
            ranks[order] = torch.arange(len(order))
            rank_sum += float(ranks[rows].float().sum()) + len(rows)
            rank_n += len(rows)
            picked_loss.append(float(loss[rows].mean()))
            pool_loss.append(float(loss.mean()))
        unique_weight.append(len(rows))
        if step + 1 in eval_steps:
            curve.append({"step": step + 1, **heldout(model, setup)})
    if stale is not None and scans:
        raise RuntimeError(f"{rule} ran {scans} scans: a stale rule must choose without a forward")
    agreement = None
    if rule == "random":  # how the learner's losses relate to the reference's at the end (the pilot: r = 0.88)
        sample = torch.linspace(0, setup.pool.shape[0] - 1, min(512, setup.pool.shape[0])).round().long()
        model.eval()
        mine = scan(model, setup.pool[sample])[0]
        ref = setup.ref_loss[sample]
        agreement = {"blocks": len(sample), "pearson": float(torch.corrcoef(torch.stack([mine, ref]))[0, 1]),
                     "learner_sd": float(mine.std()), "reference_sd": float(ref.std()),
                     "learner_mean": float(mine.mean()), "reference_mean": float(ref.mean())}
    return {
        "learner_vs_reference": agreement,
        "rule": rule, "seed": seed, "init_digest": digest, "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1), "final": curve[-1]["all"],
        "final_by_category": {c: curve[-1][c] for c in CATEGORIES if c in curve[-1]},
        "curve": curve,
        "picks_decile_share": (picks_decile / picks_decile.sum()).round(4).tolist(),
        "picks_category_share": dict(zip(CATEGORIES, (picks_category / picks_category.sum()).round(4).tolist())),
        "scanned_category_share": dict(zip(CATEGORIES, (pool_category / pool_category.sum()).round(4).tolist())),
        "picks_mean_rank": rank_sum / rank_n if rank_n else None,
        "picks_learner_loss": statistics.fmean(picked_loss) if picked_loss else None,
        "scanned_learner_loss": statistics.fmean(pool_loss) if pool_loss else None,
        "distinct_rows_per_step": statistics.fmean(unique_weight),
        "train_time_scans": scans if wrapper is None else None,  # None: CGGRModel scanned (or not) inside
        "picks_unseen_share": unseen_picked / picked,  # picks of never-trained blocks
        "scanned_unseen_share": unseen_scanned / (args.steps * args.scan),
        "pool_trained_share": float(trained.mean()),  # coverage: blocks of the pool trained at least once
        "impl": "library (CGGRModel)" if wrapper is not None else "study prototype",
        "library_settings": settings, "prototype_agreement": (agree / compared) if compared else None,
    }


HYPOTHESES = {
    "clean": "Hypothesis: on a clean corpus seen once, early in training, no rule beats `random` (the pilot): "
             "nearly every block is learnable and diversity wins. Refuted if a rule's 95% interval vs random "
             "is entirely below 0.",
    "noise": "Hypothesis: with 25% noise blocks in the stream, rules that use the reference loss (reducible, "
             "ref-filter) beat `random` because they stop spending steps on unlearnable blocks, while `hardest` "
             "loses because it picks them. Refuted if reducible's interval vs random includes 0.",
    "repeat": "Hypothesis: when the pool is read for 4 epochs, reducible loss skips blocks the learner has already "
              "memorised (learner loss below the reference's), so reducible beats `random`. Refuted if its "
              "interval vs random includes 0 or lies above it.",
    "finetune": "Hypothesis: continuing from a model pre-trained on another corpus (installed packages' code), "
                "the learner already knows what the corpora share; reducible loss points at what is specific to "
                "the target and learnable, so it beats `random`. Refuted if its interval vs random includes 0.",
    "late": "Hypothesis: later in training (continuing from a model already trained on the same corpus) the easy "
            "blocks are learnt and the loss differences between blocks are more about learnability, so "
            "reducible / hardest-type rules beat `random`. Refuted if their intervals vs random include 0.",
}

STALE_HYPOTHESIS = (
    "Hypothesis (stale scores): a rule that ranks the S by the learner's own training loss from the last step "
    "that trained each block (kept in a per-block table, +inf for blocks never trained: no scan, so a step costs "
    "what a `random` step costs) keeps a useful part of the oracle-scan `reducible-norm`'s gain. Refuted if no "
    "stale rule's 95% interval vs random lies entirely below 0, or if a stale rule's gain is no larger than "
    "`unseen-first`'s (never-trained blocks first, then uniformly: the coverage effect alone).")
STALE_HYPOTHESES = {
    **{regime: STALE_HYPOTHESIS for regime in REGIMES},
    "clean": "Hypothesis (stale scores, sanity check): each pool block is scanned once per run, so no block is "
             "ever trained before it is scanned again and every stale loss is +inf: the stale rules choose "
             "exactly as `unseen-first`, which chooses uniformly, i.e. as `random` does (ties within noise). "
             "Refuted if a stale rule's or `unseen-first`'s 95% interval vs random excludes 0.",
}

REGIME_DEFAULTS = {
    "clean": {},
    "noise": {"noise": 0.25},
    "repeat": {"epochs": 4},
    "finetune": {"init": "packages:300"},
    "late": {"init": "stdlib:300"},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=REGIMES, default="clean")
    p.add_argument("--data", default="code")
    p.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES),
                   help="selection rules (see the module docstring): " + ", ".join(BASE_RULES)
                   + ", sampled-t<τ>, stale-sampled-t<τ>, ref-filter-q<share>. The stale rules (unseen-first, "
                   "stale-*) choose from a per-block table of the learner's training losses: no scan")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--scan", type=int, default=32, help="S: sequences scanned per step")
    p.add_argument("--kept", type=int, default=8, help="k: sequences trained on per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="peak lr (default 2e-3 from scratch, 1e-3 when continuing)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the pool per run (pool = steps*S/epochs)")
    p.add_argument("--pool", type=int, default=0, help="pool size (0: steps * S / epochs)")
    p.add_argument("--noise", type=float, default=None, help="share of noise blocks in the pool and half B")
    p.add_argument("--init", default=None, help="scratch, packages:STEPS or stdlib:STEPS")
    p.add_argument("--init-batch", type=int, default=16)
    p.add_argument("--init-lr", type=float, default=2e-3)
    p.add_argument("--package-chars", type=int, default=6_000_000)
    p.add_argument("--ref-steps", type=int, default=300)
    p.add_argument("--ref-batch", type=int, default=16)
    p.add_argument("--ref-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--eval-sequences", type=int, default=256)
    p.add_argument("--evals", type=int, default=2, help="held-out evaluations after step 0")
    p.add_argument("--impl", choices=("library", "study"), default="library",
                   help="library: the rules cggr offers run through CGGRModel (router = the learner itself); "
                        "study: every rule from the study's own plain-torch prototype")
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--name", default=None, help="output name (default selection_<regime>)")
    p.add_argument("--rerender", default="", help="rewrite the Markdown (and summary) of this JSON and exit")
    p.add_argument("--combine", nargs="+", default=[], help="regime JSON files: write the rule x regime table")
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.combine, Path(args.out), args.name or "selection_regimes")
    if args.rerender:
        payload = json.loads(Path(args.rerender).read_text(encoding="utf-8"))
        payload["summary"] = summarise(payload["runs"], payload["settings"]["rules"])
        write_outputs(payload, Path(args.rerender).parent, Path(args.rerender).stem)
        return payload
    for key, value in REGIME_DEFAULTS[args.regime].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.epochs = args.epochs or 1
    args.noise = args.noise or 0.0
    args.init = args.init or "scratch"
    args.lr = args.lr or (2e-3 if args.init == "scratch" else 1e-3)
    args.ref_lr = args.ref_lr or args.lr
    for rule in args.rules:
        param = next((rule[len(p):] for p in PARAMETRIC_RULES if rule.startswith(p)), None)
        if rule not in BASE_RULES and not (param is not None and is_float(param)):
            raise SystemExit(f"--rules: unknown rule {rule!r}; expected {', '.join(BASE_RULES)}, sampled-t<τ>, "
                             "stale-sampled-t<τ> or ref-filter-q<share>")
    if not (1 <= args.kept <= args.scan) or args.steps < 1:
        raise SystemExit(f"need 1 <= --kept <= --scan and --steps >= 1, got {args.kept}, {args.scan}, {args.steps}")
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    setup = build_setup(args, log)
    eval_steps = sorted({round(i * args.steps / args.evals) for i in range(1, args.evals + 1)})
    runs = []
    for seed in args.seeds:
        model0 = build_model(setup.spec, setup.data.tokenizer.vocab_size, seed=seed)
        if setup.init_state is not None:
            model0.load_state_dict(setup.init_state)
        initial = heldout(model0, setup)
        for rule in args.rules:
            run = run_rule(rule, setup, args, seed, eval_steps, initial)
            runs.append(run)
            ref = next((r["final"] for r in runs if r["seed"] == seed and r["rule"] == "random"), None)
            log(f"seed {seed} {rule:>15}: held-out {run['final']:.4f}"
                + (f" (vs random {run['final'] - ref:+.4f})" if ref is not None and rule != "random" else "")
                + f", picks prose {run['picks_category_share']['prose']:.0%} noise "
                f"{run['picks_category_share']['noise']:.0%}, {run['seconds']:.0f} s")
    parameters = sum(x.numel() for x in model0.parameters())
    settings = {k: v for k, v in vars(args).items() if k not in ("rerender",)}
    settings.update({"parameters": parameters, "vocab": setup.data.tokenizer.vocab_size, "eval_steps": eval_steps,
                     "data_info": {k: v for k, v in setup.data.info.items() if k != "cache"}})
    stale_run = any(is_stale(r) for r in args.rules)
    payload = {"settings": settings,
               "hypothesis": STALE_HYPOTHESES[args.regime] if stale_run else HYPOTHESES[args.regime],
               "environment": environment("cpu", command=command_line()),
               "wall_seconds": round(time.perf_counter() - t_start, 1), "setup": setup.info,
               "summary": summarise(runs, args.rules), "runs": runs}
    write_outputs(payload, Path(args.out), args.name or f"selection_{args.regime}")
    return payload


if __name__ == "__main__":
    main()
