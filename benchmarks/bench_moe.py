"""PersistentTRMLP forward+backward on CUDA: persistent Triton grouped GEMMs vs torch._grouped_mm vs a loop.

Arms (same routing, same parameters, same process; bf16; SwiGLU experts; one step = forward + backward of y and
the aux loss, routing included in every MoE arm, every MoE arm computes the same (y, aux_loss)):

* ``ours``        — PersistentTRMLP(impl='triton'): router GEMM + 3 fused routing launches (softmax, top-k,
                    counting sort, aux loss; one launch for the router backward), 2 forward grouped-GEMM launches
                    (gather fused into the up-projection, SwiGLU in its epilogue, routing weight + scatter in the
                    down-projection's); backward: one gather pass for dy[tok] and w·dy[tok], the grouped GEMM
                    dy·w2ᵀ, one elementwise SwiGLU-backward + routing-weight-gradient pass, dx, x[tok], dw1, dw2.
* ``grouped_mm``  — the same layer in PyTorch (what PersistentTRMLP(impl='torch') runs on this GPU): eager routing
                    and aux loss, expert GEMMs with ``torch._grouped_mm`` (autograd through it).
* ``grouped_mm_y`` — the definition of the ``grouped_mm`` arm in the results committed before 2026-11-24 20:00 UTC:
                    routing and experts as above, backward of y only (no aux loss); kept for comparison.
* ``loop``        — the same with one GEMM per expert (host sync for the offsets).
* ``dense``       — the six dense GEMMs of the same FLOPs (M = N·k rows, no routing/gather/activation): a ceiling.

In the results committed before 2026-11-24 20:00 UTC the torch arms did not compute the aux loss (ours always
did): that arm is ``grouped_mm_y`` now, and ``speedup_vs_grouped_mm_y`` is the ratio of those runs.

TFLOP/s counts the expert GEMM FLOPs only: 3 · (2·M·d·Hc + 2·M·I·d) with M = routed (token, slot) pairs.

Usage: ``PYTHONPATH=src python benchmarks/bench_moe.py [--quick] [--sweep] [--breakdown] [--shapes 0,1,2]
[--out-dir DIR] [--act-bwd split|fused] [--routing triton|torch]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import time_fn, write_results

from cggr.kernels.grouped_gemm import GemmConfig, GroupedMLPOptions
from cggr.moe import PersistentTRMLP, aux_losses, expert_mlp_torch, route_tokens

SHAPES = [  # (N, d, I, E, k)
    (8192, 1024, 4096, 8, 2),
    (32768, 1024, 4096, 8, 2),
    (32768, 2048, 1408, 64, 6),
]


def make_layer(d, inter, n_exp, k, skew, opts, seed=0):
    torch.manual_seed(seed)
    m = PersistentTRMLP(d, inter, num_experts=n_exp, top_k=k, impl="triton", kernel_options=opts,
                        device="cuda", dtype=torch.bfloat16)
    u = torch.randn(d, device="cuda")
    u = u / u.norm()
    if skew:  # Zipf-like per-expert bias along a direction shared by every token
        bias = -1.5 * torch.log(torch.arange(1, n_exp + 1, device="cuda", dtype=torch.float32))
        with torch.no_grad():
            m.router.weight.add_((bias[:, None] / 4.0 * u[None, :]).to(torch.bfloat16))
    return m, u


def torch_layer(m, x, use_gmm):
    """PersistentTRMLP's forward on the torch path (routing, experts, aux loss), with the expert GEMMs forced."""
    plan = route_tokens(x, m.router.weight, m.top_k, impl="torch")
    y = expert_mlp_torch(x, m.expert_w1, m.expert_w2, plan, m.top_k, m.activation, use_grouped_mm=use_gmm)
    balance, _ = aux_losses(plan, m.top_k, with_z=False)
    return y, m.aux_loss_coef * balance


def step_fn(m, x, gy, arm):
    def run():
        y, aux = m(x) if arm == "ours" else torch_layer(m, x, arm != "loop")
        if arm == "grouped_mm_y":
            y.backward(gy)
        else:
            torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])
        x.grad = None
        for p in m.parameters():
            p.grad = None

    return run


def dense_fn(m_rows, d, inter, hc):
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m_rows, d, device=dev, dtype=dt)
    w1 = torch.randn(d, hc, device=dev, dtype=dt)
    w2 = torch.randn(inter, d, device=dev, dtype=dt)
    a = torch.randn(m_rows, inter, device=dev, dtype=dt)
    dy = torch.randn(m_rows, d, device=dev, dtype=dt)
    dh = torch.randn(m_rows, hc, device=dev, dtype=dt)

    def run():
        torch.mm(x, w1)  # up
        torch.mm(a, w2)  # down
        torch.mm(dy, w2.t())  # dA
        torch.mm(a.t(), dy)  # dW2
        torch.mm(dh, w1.t())  # dX
        torch.mm(x.t(), dh)  # dW1

    return run


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_shape(shape, skew, opts, arms, iters):
    n_tok, d, inter, n_exp, k = shape
    m, u = make_layer(d, inter, n_exp, k, skew, opts)
    x = torch.randn(n_tok, d, device="cuda", dtype=torch.bfloat16)
    if skew:
        x = (x.float() + 4.0 * u).to(torch.bfloat16)
    x.requires_grad_()
    gy = torch.randn(n_tok, d, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_ours, _ = m(x)
        plan = route_tokens(x, m.router.weight, k)
        y_ref = expert_mlp_torch(x, m.expert_w1, m.expert_w2, plan, k, m.activation)
    counts = plan.counts[:n_exp].float()
    imbalance = float(counts.max() / counts.mean())
    hc = m.expert_w1.shape[2]
    m_rows = n_tok * k
    flops = 3 * (2 * m_rows * d * hc + 2 * m_rows * inter * d)
    row = {"N": n_tok, "d": d, "I": inter, "E": n_exp, "k": k, "routing": "skewed" if skew else "balanced",
           "max_load/mean": round(imbalance, 2), "rel_err_vs_grouped_mm": rel(y_ours, y_ref)}
    for arm in arms:
        fn = dense_fn(m_rows, d, inter, hc) if arm == "dense" else step_fn(m, x, gy, arm)
        t = time_fn(fn, warmup=2, iters=iters)
        row[f"{arm}_ms"] = t.median_ms
        row[f"{arm}_tflops"] = flops / t.median_ms / 1e9
    if "grouped_mm" in arms and "ours" in arms:
        row["speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / row["ours_ms"]
    if "grouped_mm_y" in arms and "ours" in arms:
        row["speedup_vs_grouped_mm_y"] = row["grouped_mm_y_ms"] / row["ours_ms"]
    del m, x
    torch.cuda.empty_cache()
    return row


def fmt_row(r):
    keys = [k for k in r if k.endswith("_ms") or k.startswith("speedup") or k.endswith("tflops")]
    head = f"N={r['N']} d={r['d']} I={r['I']} E={r['E']} k={r['k']} {r['routing']:8s} imb={r['max_load/mean']}"
    return head + " " + " ".join(f"{k}={r[k]:.3g}" for k in keys)


SWEEP = {  # name -> options
    "default": GroupedMLPOptions(),
    "fused_act_bwd": GroupedMLPOptions(act_bwd_split=False),
    "torch_routing": GroupedMLPOptions(fused_routing=False),
    "gbwd128x128": GroupedMLPOptions(act_bwd_gemm=GemmConfig(128, 128, 64, 8, 4)),
    "gbwd128x256s4": GroupedMLPOptions(act_bwd_gemm=GemmConfig(128, 256, 64, 8, 4)),
    "up128x64s4": GroupedMLPOptions(up=GemmConfig(128, 64, 64, 4, 4)),
    "down128x128s4": GroupedMLPOptions(down=GemmConfig(128, 128, 64, 8, 4), dx=GemmConfig(128, 128, 64, 8, 4)),
}


def _median_ms(fn, iters=10):
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


BREAKDOWN = {  # kernel -> candidate (block_m, block_n, block_k, warps, stages, programs_per_sm[, prefetch_h])
    "up": [(128, 128, 32, 8, 4, 1)],
    "down": [(128, 256, 64, 8, 4, 1)],
    "act_bwd_split": [None, (128, 256, 64, 8, 3, 1), (128, 256, 64, 8, 4, 1), (128, 128, 64, 8, 4, 1),
                      (128, 128, 64, 4, 4, 2)],  # None: the shape-chosen default; the rest: the G GEMM's tiles
    "act_bwd": [(128, 64, 64, 8, 4, 1, True)],  # the fused kernel (act_bwd_split=False)
    "dx": [(128, 256, 64, 8, 3, 1)],
    "wgrad1": [(128, 256, 64, 8, 3, 1)],
    "wgrad2": [(128, 256, 64, 8, 3, 1)],
}


def breakdown(shape, log):
    """Time each launch of ours alone for several tile configurations, and the non-GEMM steps."""
    from cggr.kernels import grouped_gemm as gg

    n_tok, d, inter, n_exp, k = shape
    m, _ = make_layer(d, inter, n_exp, k, False, GroupedMLPOptions())
    x = torch.randn(n_tok, d, device="cuda", dtype=torch.bfloat16)
    w1, w2 = m.expert_w1.detach(), m.expert_w2.detach()
    hc = w1.shape[2]
    plan = route_tokens(x, m.router.weight.detach(), k)
    rows = n_tok * k
    new = lambda c: torch.empty(rows, c, device="cuda", dtype=torch.bfloat16)
    a, h, yp, dh, dxp, g = new(inter), new(hc), new(d), new(hc), new(d), new(inter)
    dy = torch.randn(n_tok, d, device="cuda", dtype=torch.bfloat16)
    wts = plan.weights.float().contiguous()
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    gf = {"up": 2 * rows * d * hc, "down": 2 * rows * inter * d, "act_bwd": 2 * rows * inter * d,
          "act_bwd_split": 2 * rows * inter * d, "dx": 2 * rows * hc * d, "wgrad1": 2 * rows * d * hc,
          "wgrad2": 2 * rows * inter * d}
    head = f"N={n_tok} d={d} I={inter} E={n_exp} k={k}"
    for name, cands in BREAKDOWN.items():
        for c in cands:
            cfg = GemmConfig(*c[:5]) if c is not None else None
            opts = GroupedMLPOptions(programs_per_sm=c[5] if c else 1, prefetch_h=c is None or len(c) < 7 or c[6],
                                     act_bwd_gemm=cfg)
            if name == "up":
                fn = lambda cfg=cfg, opts=opts: gg._launch_rows(
                    x, plan.tok, w1, plan.offs, a, None, None, h, n_rows=rows, K=d, N=inter, stride_be=w1.stride(0),
                    stride_bk=w1.stride(1), stride_bn=w1.stride(2), act=0, cfg=cfg, opts=opts)
            elif name == "down":
                fn = lambda cfg=cfg, opts=opts: gg._launch_rows(
                    a, None, w2, plan.offs, yp, plan.pair, wts, None, n_rows=rows, K=inter, N=d,
                    stride_be=w2.stride(0), stride_bk=w2.stride(1), stride_bn=w2.stride(2), act=-1, cfg=cfg, opts=opts)
            elif name == "act_bwd_split":
                fn = lambda opts=opts: gg._launch_act_bwd_split(yp, w2, plan.offs, h, wts, dh, act=0, opts=opts)
            elif name == "act_bwd":
                fn = lambda cfg=cfg, opts=opts: gg._launch_act_bwd(
                    yp, None, w2, plan.offs, h, wts, dh, act=0, cfg=cfg, opts=opts)
            elif name == "dx":
                fn = lambda cfg=cfg, opts=opts: gg._launch_rows(
                    dh, None, w1, plan.offs, dxp, plan.pair, None, None, n_rows=rows, K=hc, N=d,
                    stride_be=w1.stride(0), stride_bk=w1.stride(2), stride_bn=w1.stride(1), act=-1, cfg=cfg, opts=opts)
            elif name == "wgrad1":
                fn = lambda cfg=cfg, opts=opts: gg._launch_wgrad(
                    dxp, None, dh, None, None, plan.offs, dw1, cfg=cfg, opts=opts)
            else:
                fn = lambda cfg=cfg, opts=opts: gg._launch_wgrad(
                    a, None, yp, None, None, plan.offs, dw2, cfg=cfg, opts=opts)
            ms = _median_ms(fn)
            log(f"breakdown {head} {name:13s} cfg={c} {ms:.3f} ms {gf[name] / ms / 1e9:.0f} TFLOP/s")
    g_cfg = gg._act_bwd_gemm_cfg(inter, GroupedMLPOptions())
    ew = lambda: gg._act_bwd_ew_kernel[(rows,)](
        g, h, wts, plan.offs, dh, torch.empty(rows, device="cuda"), n_exp, inter, g.stride(0), h.stride(0), ACT=0,
        BN=min(1024, max(128, gg.triton.next_power_of_2(inter))), num_warps=4, num_stages=2)
    ew_ms = _median_ms(ew)
    log(f"breakdown {head} act_bwd_split: G GEMM default tiles {g_cfg}; elementwise pass alone {ew_ms:.3f} ms "
        f"({(rows * inter * 2 * 5) / ew_ms / 1e9:.0f} GB/s counting G, H read, dH written)")
    xr = x.clone().requires_grad_()
    wr = m.router.weight

    def route_step(impl):
        def run():
            p = route_tokens(xr, wr, k, impl=impl)
            bal, z = (p.balance, p.z) if p.balance is not None else aux_losses(p, k)
            torch.autograd.backward([p.weights, bal, z], [torch.ones_like(p.weights), torch.ones_like(bal),
                                                           torch.ones_like(z)])
        return run

    steps = {
        "route_torch": lambda: route_tokens(x, wr, k, impl="torch"),
        "aux_torch": lambda: aux_losses(plan, k),
        "route_fused": lambda: route_tokens(x, wr, k, impl="triton"),
        "route+aux fwd+bwd torch": route_step("torch"),
        "route+aux fwd+bwd fused": route_step("triton"),
        "sum_slots": lambda: gg._sum_slots(yp, None, k),
        "gather_dy2": lambda: gg._launch_gather(dy, plan.tok, plan.offs, rows, scale=wts),
        "gather_x": lambda: gg._launch_gather(x, plan.tok, plan.offs, rows),
        "fwd": lambda: m(x),
        "fwd+bwd": lambda: torch.autograd.backward(list(m(xr)), [dy, torch.ones((), device="cuda")]),
    }
    for name, fn in steps.items():
        log(f"breakdown {head} {name:13s} {_median_ms(fn):.3f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations, no loop arm, no files")
    ap.add_argument("--sweep", action="store_true", help="time option variants of ours on the chosen shapes")
    ap.add_argument("--shapes", default="0,1,2", help="comma-separated indices into SHAPES")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--breakdown", action="store_true", help="time each kernel of ours alone, several configs")
    ap.add_argument("--out-dir", default=None, help="folder of moe.json/.md (and moe.breakdown.txt with "
                                                    "--breakdown); default benchmarks/results/<device>/")
    ap.add_argument("--act-bwd", choices=("split", "fused"), default="split",
                    help="ours: activation backward as GEMM + elementwise pass (split) or in the GEMM epilogue")
    ap.add_argument("--routing", choices=("triton", "torch"), default="triton",
                    help="ours: fused Triton routing kernels or the eager PyTorch routing")
    args = ap.parse_args()
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    opts = GroupedMLPOptions(act_bwd_split=args.act_bwd == "split", fused_routing=args.routing == "triton")
    if args.breakdown:
        out_file = None
        if args.out_dir is not None:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            out_file = Path(args.out_dir) / "moe.breakdown.txt"
            out_file.write_text("")

        def log(line):  # appended line by line: a run cut short keeps what it measured
            print(line, flush=True)
            if out_file is not None:
                with out_file.open("a") as f:
                    f.write(line + "\n")

        for shape in shapes:
            breakdown(shape, log)
        return
    if args.sweep:
        for shape in shapes:
            for name, sweep_opts in SWEEP.items():
                r = bench_shape(shape, False, sweep_opts, ["ours"], 5)
                print(f"sweep {name:14s} {fmt_row(r)}", flush=True)
        return
    arms = ["ours", "grouped_mm", "grouped_mm_y", "dense"] + ([] if args.quick else ["loop"])
    rows = []
    notes = (__doc__ or "").split("Usage")[0]
    notes += f"Options of ours: act_bwd={args.act_bwd}, routing={args.routing}.\n"
    for shape in shapes:
        for skew in (False, True):
            r = bench_shape(shape, skew, opts, arms, 5 if args.quick else args.iters)
            rows.append(r)
            print(fmt_row(r), flush=True)
            if not args.quick:  # rewritten after every row: a run cut short keeps what it measured
                write_results("moe", rows, title="PersistentTRMLP forward+backward (bf16, SwiGLU)", notes=notes,
                              out_dir=args.out_dir)


if __name__ == "__main__":
    main()
