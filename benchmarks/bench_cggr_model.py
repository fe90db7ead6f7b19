"""Benchmark: CGGRModel batch split vs standard training vs a random-sequence control (issue 3).

Model: the SmolLM-135M architecture (LlamaConfig: vocab 49152, hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, tied embeddings), random init, bf16 weights, the model's default attention implementation, fused
AdamW; one timed step = forward + backward + optimizer step + zero_grad.

Arms:
  standard  model(input_ids, labels=labels).loss on the whole batch
  cggr      CGGRModel(ratio 0.25, 4-layer router, warmup 0): router scores the batch, the hardest
            k = round(0.25 · B_scan) sequences are trained
  random    CGGRModel(selection='random') at the same ratio: k random sequences, no router (the control)
  cggr-outputs  (opt-in, --arms) cggr with head_options=LinearCrossEntropyOptions(workspace='outputs'): the fused
            head without its 256 MiB logits workspace

Protocols:
  equal_scan  every arm receives the same B sequences per step (samples/s = B / step time)
  free_lunch  standard trains on B; cggr and random scan 4·B sequences and train on B of them
              (samples scanned/s = 4·B / step time); the step-time ratio to standard is the cost

Also reported for the cggr arm (same run): router forward alone, scoring alone, and a standard step on the
k selected sequences alone (the ceiling: router + scoring + sub-step).

With ``--compile MODE`` (e.g. ``reduce-overhead``: CUDA graphs, which removes the host's kernel-launch cost of
small steps) every arm's forward (+ the backward AOTAutograd derives from it) runs under
``torch.compile(mode=MODE, dynamic=False)``: the standard model's loss, and the whole CGGRModel call (router,
selection, the k-sequence forward and the loss); the optimizer step stays eager (fused AdamW). Compilation happens
in the untimed warm-up steps. The breakdown rows stay eager.

With ``--cuda-graph`` every arm's WHOLE step (the standard step too; for cggr/random: router forward, scoring,
sequence selection, gather, the k-sequence forward with the loss, backward, and fused AdamW with
``capturable=True``) is captured once per shape and protocol with ``torch.cuda.graph`` after warm-up steps on a
side stream (PyTorch's whole-network capture; benchmarks/_cggr_model_graph.py), and a timed step is the copy of
the next batch into the static input + ``graph.replay()`` (+ the CGGRModel's ``step()``, one tiny launch):
the host's per-kernel launch cost is gone, so the timings show GPU work. The breakdown rows are graphed too.
Results go to ``cggr_model_graphed`` by default.

Usage: python benchmarks/bench_cggr_model.py [--shapes 4x512,16x512,16x2048,32x2048] [--iters 10]
       python benchmarks/bench_cggr_model.py --compile reduce-overhead --shapes 16x2048,32x2048 --free-lunch-shapes ""
       python benchmarks/bench_cggr_model.py --cuda-graph --shapes 4x512,16x2048,32x2048 --free-lunch-shapes 4x512
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from benchmarks._cggr_model_graph import graphed_no_grad, graphed_train_step
from benchmarks._timing import Timing, markdown_table, time_fn, write_results

from cggr import CGGRModel, create_truncated_router
from cggr.functional import LinearCrossEntropyOptions, token_scores
from cggr.scoring import difficulty

ARMS = ("standard", "cggr", "random", "cggr-outputs")  # cggr-outputs: opt-in (--arms), not a default arm
RATIO = 0.25
ROUTER_LAYERS = 4
SCAN_FACTOR = 4


def _quantile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def smollm_135m(attn: str | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    if attn:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)


def batches(n: int, b: int, t: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(b * 100003 + t)
    return [torch.randint(0, vocab, (b, t), device="cuda", generator=g) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4x512,16x512,16x2048,32x2048")
    ap.add_argument("--free-lunch-shapes", default="4x512,16x512")
    ap.add_argument("--iters", type=int, default=8, help="timed steps per arm per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the arms")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", default=None, help="attention implementation (default: the model's default)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default=None,
                    help="file stem (default cggr_model; cggr_model_compiled with --compile, "
                         "cggr_model_graphed with --cuda-graph)")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="torch.compile every arm's forward with this mode (default, reduce-overhead, "
                         "max-autotune-no-cudagraphs); default: eager")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="capture every arm's whole training step in a CUDA graph and time replays")
    ap.add_argument("--arms", default="cggr,random", help="comma-separated arms (standard is always run)")
    args = ap.parse_args()
    if args.cuda_graph and args.compile:
        raise SystemExit("--cuda-graph and --compile are exclusive (choose one execution mode)")
    run_arms = ["standard"] + [a for a in ARMS[1:] if a in args.arms.split(",")]
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)}; choose among {', '.join(ARMS)}")
    if args.name is None:
        args.name = "cggr_model_compiled" if args.compile else "cggr_model_graphed" if args.cuda_graph else "cggr_model"
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    model = smollm_135m(args.attn)
    model.train()
    vocab = model.config.vocab_size
    # capturable: the step count and bias corrections stay on the device, so the step can live in a CUDA graph
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=args.cuda_graph)
    router = create_truncated_router(model, ROUTER_LAYERS)
    arms = {
        "cggr": CGGRModel(model, router=router, min_tokens_ratio=RATIO, warmup_steps=0),
        "random": CGGRModel(model, router=router, min_tokens_ratio=RATIO, warmup_steps=0, selection="random", seed=0),
        "cggr-outputs": CGGRModel(model, router=router, min_tokens_ratio=RATIO, warmup_steps=0,
                                  head_options=LinearCrossEntropyOptions(workspace="outputs")),
    }

    def standard_loss(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, labels=x).loss

    forwards = {"standard": standard_loss, **{arm: (lambda x, m=m: m(x, labels=x).loss) for arm, m in arms.items()}}
    if args.compile:
        forwards = {arm: torch.compile(fn, mode=args.compile, dynamic=False) for arm, fn in forwards.items()}

    pool = None  # the CUDA-graph memory pool of the current shape (--cuda-graph)
    # Every graph captured into the current pool stays alive until the shape changes: capturing into a shared
    # pool whose graphs were all freed trips an internal assert of the caching allocator (torch 2.11).
    alive: list = []

    def step_fn(arm: str, data: list[torch.Tensor], *, eager: bool = False):
        state = {"i": 0}
        forward = standard_loss if eager else forwards[arm]
        if args.cuda_graph:  # whole step captured once (warm-up steps included), then copy + replay
            graphed = graphed_train_step(forward, opt, data[0], warmup=args.warmup, pool=pool)
            alive.append(graphed)

            def replay_step():
                graphed(data[state["i"] % len(data)])
                state["i"] += 1
                if arm != "standard":
                    arms[arm].step()

            return replay_step

        def step():
            x = data[state["i"] % len(data)]
            state["i"] += 1
            loss = forward(x)
            if arm != "standard":
                arms[arm].step()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    rows = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    fl_shapes = {tuple(int(v) for v in s.split("x")) for s in args.free_lunch_shapes.split(",") if s}
    for b, t in shapes:
        if args.cuda_graph:  # a fresh pool per shape: the previous shape's graphs are freed with it
            fns = {}
            alive.clear()
            # tensors that replays left in the pool (grads, the wrappers' last selection) would pin its segments
            opt.zero_grad(set_to_none=True)
            for wrapper in arms.values():
                wrapper._last = {}
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            pool = torch.cuda.graph_pool_handle()
        for protocol in ("equal_scan", "free_lunch"):
            if protocol == "free_lunch" and (b, t) not in fl_shapes:
                continue
            scan = b if protocol == "equal_scan" else SCAN_FACTOR * b
            std_data = batches(4, b, t, vocab)
            scan_data = std_data if scan == b else batches(4, scan, t, vocab)
            # Arms interleaved over several rounds (drift and clock changes hit every arm alike).
            fns = {}
            peaks: dict[str, int] = dict.fromkeys(run_arms, 0)
            for arm in run_arms:  # with --cuda-graph this captures: the peak of warm-up + capture is recorded
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fns[arm] = step_fn(arm, std_data if arm == "standard" else scan_data)
                torch.cuda.synchronize()
                peaks[arm] = torch.cuda.max_memory_allocated() if args.cuda_graph else 0
            times: dict[str, list[float]] = {arm: [] for arm in run_arms}
            for r in range(args.rounds):
                for arm in run_arms:
                    if not args.cuda_graph:  # (graph pools are private: emptying the cache would not touch them)
                        torch.cuda.empty_cache()
                    tm = time_fn(fns[arm], warmup=args.warmup if r == 0 else 1, iters=args.iters)
                    times[arm] += tm.times_ms
                    peaks[arm] = max(peaks[arm], tm.peak_mem_bytes)
            res = {arm: Timing(statistics.median(times[arm]), times[arm], peaks[arm], args.warmup) for arm in run_arms}
            base = res["standard"]
            for arm, tm in res.items():
                scanned = b if arm == "standard" else scan
                trained = b if arm == "standard" else arms[arm].num_selected_sequences(scan)
                rows.append(
                    {
                        "protocol": protocol,
                        "B": b,
                        "T": t,
                        "arm": arm,
                        "scanned": scanned,
                        "trained": trained,
                        "step_ms": tm.median_ms,
                        "samples_per_s": scanned / tm.median_ms * 1e3,
                        "peak_mem_gib": tm.peak_mem_gib,
                        "step_time_vs_std": tm.median_ms / base.median_ms,
                        "samples_per_s_vs_std": (scanned / tm.median_ms) / (b / base.median_ms),
                        "mem_vs_std": tm.peak_mem_bytes / max(1, base.peak_mem_bytes),
                        "step_ms_p10": _quantile(tm.times_ms, 0.1),
                        "step_ms_p90": _quantile(tm.times_ms, 0.9),
                    }
                )
            print(markdown_table(rows[-len(run_arms):]), flush=True)
            if protocol == "equal_scan":
                # Breakdown of the cggr arm: router forward, scoring, and a step on the k sequences alone.
                x = std_data[0]
                k = arms["cggr"].num_selected_sequences(b)
                targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
                logits = router(x)
                if args.cuda_graph:
                    g_router = graphed_no_grad(router, x, pool=pool)
                    r_ms = time_fn(lambda g=g_router, x=x: g(x), warmup=2, iters=args.iters).median_ms
                    g_score = graphed_no_grad(lambda lg, tg=targets: difficulty(token_scores(lg, tg), "combined"),
                                              logits, pool=pool)
                    s_ms = time_fn(g_score.replay, warmup=2, iters=args.iters).median_ms
                    alive.extend([g_router, g_score])
                    del g_router, g_score  # only `alive` may hold graphs: the pool is freed with the last of them
                else:
                    r_ms = time_fn(lambda x=x: router(x), warmup=2, iters=args.iters).median_ms
                    s_ms = time_fn(
                        lambda lg=logits, tg=targets: difficulty(token_scores(lg, tg), "combined"),
                        warmup=2,
                        iters=args.iters,
                    ).median_ms
                del logits
                sub = [d[:k].contiguous() for d in std_data]
                sub_ms = time_fn(step_fn("standard", sub, eager=True), warmup=2, iters=args.iters).median_ms
                rows.append(
                    {
                        "protocol": "breakdown",
                        "B": b,
                        "T": t,
                        "arm": f"router {r_ms:.1f} ms + scoring {s_ms:.1f} ms + step on k={k} {sub_ms:.1f} ms",
                        "scanned": b,
                        "trained": k,
                        "step_ms": r_ms + s_ms + sub_ms,
                        "samples_per_s": b / (r_ms + s_ms + sub_ms) * 1e3,
                        "peak_mem_gib": float("nan"),
                        "step_time_vs_std": (r_ms + s_ms + sub_ms) / base.median_ms,
                        "samples_per_s_vs_std": base.median_ms / (r_ms + s_ms + sub_ms),
                        "mem_vs_std": float("nan"),
                    }
                )
                print(markdown_table(rows[-1:]), flush=True)

    mode = f"torch.compile(mode={args.compile!r}, dynamic=False) on every arm's forward" if args.compile else "eager"
    if args.cuda_graph:
        mode = (
            "CUDA graphs: every arm's whole step (forward, CGGR routing/selection, backward, fused capturable AdamW) "
            "captured once per shape/protocol after warm-up on a side stream; a timed step = copy of the batch "
            "into the static input + replay (+ CGGRModel.step()); peak_mem_gib = peak allocated during that arm's "
            "warm-up and capture (graph pools of one shape are shared)"
        )
    notes = (
        f"Execution: {mode}. "
        "SmolLM-135M architecture (LlamaConfig, random init), bf16 weights, fused AdamW, attention "
        f"implementation `{model.config._attn_implementation}`. One step = forward + backward + optimizer step. "
        f"cggr: CGGRModel(min_tokens_ratio={RATIO}, {ROUTER_LAYERS}-layer router, warmup 0); random: same ratio, "
        "random sequences, no router. equal_scan: every arm receives B sequences; free_lunch: cggr/random scan "
        f"{SCAN_FACTOR}·B and train B, standard trains B. Ratios are to the standard arm of the same row group "
        "(same process). 'breakdown' rows: the cggr step's parts timed separately (router forward, scoring, a "
        "standard step on the k selected sequences; each graphed with --cuda-graph, else eager); their sum is "
        "the ceiling for the cggr arm. "
        f"Median of {args.rounds} interleaved rounds x {args.iters} CUDA-event timed steps per arm (p10/p90 "
        f"shown) after {args.warmup} warm-up steps; random token data."
    )
    cols = [
        "protocol", "B", "T", "arm", "scanned", "trained", "step_ms", "samples_per_s", "peak_mem_gib",
        "step_time_vs_std", "samples_per_s_vs_std", "mem_vs_std", "step_ms_p10", "step_ms_p90",
    ]  # fmt: skip
    paths = write_results(
        args.name, rows, title="CGGRModel batch split vs standard (SmolLM-135M shape)", notes=notes, columns=cols,
        out_dir=args.out_dir,
    )  # fmt: skip
    print(markdown_table(rows, cols))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
