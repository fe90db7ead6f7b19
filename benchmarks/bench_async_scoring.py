"""Benchmark: what cheaper scoring saves in a CGGRModel training step (issue 15, Build item 3).

Model: the SmolLM-135M architecture (bench_cggr_model.smollm_135m: random init, bf16, fused AdamW); one timed step
= forward + backward + optimizer step + zero_grad (+ the scoring each arm does inside the step). Free-lunch
protocol: ``standard`` trains on B sequences; every other arm scans S = scan · B sequences and trains on B of
them (ratio 1 / scan). All arms run in the same process, interleaved over rounds, timed with CUDA events
(benchmarks/_timing.py: median of the timed steps).

Arms:
  standard      model(input_ids, labels=labels).loss on B sequences (the baseline)
  random        CGGRModel(selection='random'): B of the S at random, no router (the floor of any selector)
  cggr          CGGRModel(selection='topk'): the 4-layer router scores all S inline, then the step
  cggr-scan2    the same with S = 2 · B (half the router's work; a protocol choice, here for its cost)
  cggr-stale    CGGRModel(sequence_scores=) from a SequenceScoreCache: no router in the step (scores reused
                from an earlier visit of the same examples; the refresh cost is the router row below)
  cggr-async    AsyncCGGRScorer: the step selects by scores prefetched during the previous step's backward on a
                side CUDA stream, and prefetches the next batch's (overlap of the router with the backward)

Also reported: the router's no-grad forward over S sequences alone (``router-only``), i.e. what cggr pays on top
of cggr-stale when nothing overlaps.

Usage (H200; about 2 minutes)::

    python benchmarks/bench_async_scoring.py --shapes 4x512,16x512,8x2048 --scan 4
    python benchmarks/bench_async_scoring.py --tiny --device cpu --iters 2 --rounds 1   # smoke run, any machine

Writes benchmarks/results/<device>/async_scoring.{json,md} (``--name`` to change, ``--out-dir`` to redirect).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from benchmarks._timing import Timing, markdown_table, time_fn, write_results

from cggr import AsyncCGGRScorer, CGGRModel, SequenceScoreCache, create_truncated_router

ARMS = ("standard", "random", "cggr", "cggr-scan2", "cggr-stale", "cggr-async")
ROUTER_LAYERS = 4


def build_model(tiny: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        dtype = torch.float32
    else:
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                          max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, dtype).train()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4x512,16x512,8x2048", help="comma-separated BxT (B = trained sequences)")
    ap.add_argument("--scan", type=int, default=4, help="scan factor S / B of the cggr arms (cggr-scan2: 2)")
    ap.add_argument("--iters", type=int, default=8, help="timed steps per arm per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the arms")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS[1:]), help="comma-separated arms (standard always runs)")
    ap.add_argument("--tiny", action="store_true", help="a 6-layer 64-wide model (smoke runs)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--name", default="async_scoring")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    run_arms = ["standard"] + [a for a in ARMS[1:] if a in args.arms.split(",")]
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)}; choose among {', '.join(ARMS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: pass --device cpu (with --tiny) for a smoke run")

    model = build_model(args.tiny, args.device)
    vocab = model.config.vocab_size
    fused = args.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    router = create_truncated_router(model, ROUTER_LAYERS)

    def wrapper(ratio: float, selection: str = "topk") -> CGGRModel:
        return CGGRModel(model, router=router, min_tokens_ratio=ratio, warmup_steps=0, selection=selection, seed=0)

    rows: list[dict] = []
    for shape in [s for s in args.shapes.split(",") if s]:
        b, t = (int(v) for v in shape.split("x"))
        scans = {arm: (2 if arm == "cggr-scan2" else args.scan) * b for arm in run_arms}
        scans["standard"] = b
        g = torch.Generator(device=args.device).manual_seed(b * 1009 + t)
        data = {s: [torch.randint(0, vocab, (s, t), device=args.device, generator=g) for _ in range(4)]
                for s in set(scans.values())}
        steps = {}
        for arm in run_arms:
            steps[arm] = _step_fn(arm, model, opt, data[scans[arm]], wrapper, scans[arm], b)
        times: dict[str, list[float]] = {arm: [] for arm in run_arms}
        peaks = dict.fromkeys(run_arms, 0)
        for r in range(args.rounds):
            for arm in run_arms:
                tm = time_fn(steps[arm], warmup=args.warmup if r == 0 else 1, iters=args.iters)
                times[arm] += tm.times_ms
                peaks[arm] = max(peaks[arm], tm.peak_mem_bytes)
        x = data[args.scan * b][0]
        router_ms = time_fn(lambda x=x: router(x), warmup=2, iters=args.iters).median_ms
        res = {arm: Timing(statistics.median(times[arm]), times[arm], peaks[arm], args.warmup) for arm in run_arms}
        base = res["standard"].median_ms
        first = len(rows)
        for arm, tm in res.items():
            rows.append({
                "B": b, "T": t, "arm": arm, "scanned": scans[arm], "trained": b, "step_ms": tm.median_ms,
                "step_vs_std": tm.median_ms / base, "scanned_per_s": scans[arm] / tm.median_ms * 1e3,
                "scanned_per_s_vs_std": (scans[arm] / tm.median_ms) / (b / base),
                "peak_mem_gib": tm.peak_mem_bytes / 2**30,
            })
        rows.append({"B": b, "T": t, "arm": "router-only", "scanned": args.scan * b, "trained": 0,
                     "step_ms": router_ms, "step_vs_std": router_ms / base, "scanned_per_s": float("nan"),
                     "scanned_per_s_vs_std": float("nan"), "peak_mem_gib": float("nan")})
        print(markdown_table(rows[first:]), flush=True)
    notes = (f"Free-lunch protocol: standard trains on B; the other arms scan S = scan x B (cggr-scan2: 2 x B) and "
             f"train on B. Router: first {ROUTER_LAYERS} layers + head. Median of {args.rounds} x {args.iters} "
             "CUDA-event-timed steps, arms interleaved in one process. cggr-stale omits the router entirely (its "
             "refresh cost is the router-only row); cggr-async overlaps the next batch's router with the backward.")
    write_results(args.name, rows, title="Cheaper scoring: stale and side-stream scores vs inline scoring",
                  notes=notes, out_dir=args.out_dir, extra={"argv": sys.argv, "scan": args.scan})
    return rows


def _step_fn(arm, model, opt, data, wrapper, scan, b):
    """One training step of ``arm`` on the next batch of ``data`` (a zero-argument callable)."""
    state = {"i": 0}

    def batch():
        x = data[state["i"] % len(data)]
        state["i"] += 1
        return x

    def finish(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if arm == "standard":
        return lambda: finish(model(input_ids=(x := batch()), labels=x).loss)
    ratio = b / scan
    cm = wrapper(ratio, "random" if arm == "random" else "topk")
    if arm in ("random", "cggr", "cggr-scan2"):
        return lambda: finish(cm((x := batch()), labels=x).loss)
    if arm == "cggr-stale":
        cache = SequenceScoreCache(len(data) * scan, device=data[0].device)
        for j, x in enumerate(data):  # scored once, up front (an earlier epoch's scores)
            cache.update(torch.arange(j * scan, (j + 1) * scan, device=x.device), cm.score_sequences(x, x))

        def stale():
            j = state["i"] % len(data)
            x = batch()
            idx = torch.arange(j * scan, (j + 1) * scan, device=x.device)
            finish(cm(x, labels=x, sequence_scores=cache.lookup(idx)).loss)

        return stale
    scorer = AsyncCGGRScorer(cm)
    pending = {"scores": scorer.score(data[0], data[0])}

    def overlapped():
        x = batch()
        loss = cm(x, labels=x, sequence_scores=pending["scores"]).loss
        nxt = data[state["i"] % len(data)]
        scorer.prefetch(nxt, nxt)
        loss.backward()
        pending["scores"] = scorer.wait()  # before the optimizer touches the router's weights
        opt.step()
        opt.zero_grad(set_to_none=True)

    return overlapped


if __name__ == "__main__":
    main()
