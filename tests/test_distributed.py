"""CGGRModel under torch.distributed: DDP, FSDP2 (``fully_shard``) and Accelerate, 2 CPU processes over gloo.

Every check compares against an independent single-process reference built from the same initial weights:
per-rank selection against the mean of per-rank single-process gradients (what DDP/FSDP compute), global
selection against ONE process on the concatenated batch of both ranks (loss, chosen sequences, kept tokens and
every gradient). Models are fp64 (the loss itself is fp32, as HF computes it; the LoRA test's model is fp32),
batches are fresh random tokens with left and right padding and ignored labels. The bodies take a device so that
tests/gpu/test_distributed_gpu.py runs the same checks over NCCL on 2 GPUs.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cggr import CGGRModel
from tests._distributed import run_gloo

pytest.importorskip("transformers")

V = 48


def _llama(dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def _global_batch(world: int, b: int, t: int, seed: int, device="cpu") -> tuple[torch.Tensor, ...]:
    """(W, B, T) ids, labels (ignored spans, one row with no valid label) and masks (left and right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (world, b, t), generator=g)
    labels = ids.clone()
    labels[0, 1, 2:6] = -100
    labels[-1, 0, :] = -100  # nothing to learn: never chosen before a row that has something
    mask = torch.ones_like(ids)
    mask[0, 2, : t // 3] = 0  # left padding
    mask[-1, 1, t - 4 :] = 0  # right padding
    labels = labels.masked_fill(mask == 0, -100)
    return ids.to(device), labels.to(device), mask.to(device)


def _full(p: torch.Tensor) -> torch.Tensor:
    """A (possibly FSDP2-sharded DTensor) gradient as one full tensor."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _assert_grads(model: nn.Module, ref: nn.Module, rtol: float, atol: float, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        got, want = _full(p.grad), q.grad
        assert got is not None and want is not None, name
        assert torch.allclose(got.to(want.dtype), want, rtol=rtol, atol=atol), (
            f"{what}: {name} max |diff| {(got - want).abs().max():.3g} (scale {want.abs().max():.3g})"
        )


# --------------------------------------------------------------------------- global selection (DDP)
def _global_selection_body(rank, world, device, dtype, tol):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    configs = [
        {},  # the router's scores; position_ids (a batch-shaped keyword tensor) travel with the rows
        {"token_ratio": 0.4},
        {"token_ratio": 0.4, "fused_head": True},  # the fused head's static row bound must cover a rank's share
        {"given": True},  # precomputed sequence_scores (e.g. stale ones) instead of the router's
    ]
    for c, extra in enumerate(configs):
        model = _llama(dtype, device)
        ref_model = copy.deepcopy(model)
        # warm-up 1 -> 0.75 -> 0.5 over three steps: k per rank 4, 3, 2 (K = 8, 6, 4 = round(ratio · 8))
        given = extra.pop("given", False)
        kw = dict(num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=2, **extra)
        cm = CGGRModel(model, global_selection=True, **kw)
        ddp = DDP(cm, **ddp_kw)
        ref = CGGRModel(ref_model, **kw)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        for step in range(3):
            ids, labels, mask = _global_batch(world, 4, 11, seed=100 * c + step, device=device)
            extra_in = {}
            if c == 0:  # left padding: positions count from the first real token
                extra_in["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            if given:
                g = torch.Generator().manual_seed(step)
                extra_in["sequence_scores"] = torch.randn(world, 4, generator=g, dtype=torch.float64).to(device)
            loss = ddp(ids[rank], labels=labels[rank], attention_mask=mask[rank],
                       **{key: val[rank] for key, val in extra_in.items()}).loss
            loss.backward()
            ref_loss = ref(ids.flatten(0, 1), labels=labels.flatten(0, 1), attention_mask=mask.flatten(0, 1),
                           **{key: val.flatten(0, 1) for key, val in extra_in.items()}).loss
            ref_loss.backward()
            got, want = cm.get_metrics(), ref.get_metrics()
            what = f"config {c} {extra}, step {step}"
            assert got["selected_indices"] == sorted(want["selected_indices"]), what
            for key in ("tokens_selected", "tokens_total", "sequences_selected", "batch_size"):
                assert got[key] == want[key], (what, key, got[key], want[key])
            # the mean of the ranks' losses is the global mean loss; DDP's gradient mean is its gradient
            assert torch.allclose(_mean_over_ranks(loss), ref_loss, rtol=tol, atol=tol), (what, loss, ref_loss)
            _assert_grads(model, ref_model, rtol=tol, atol=tol, what=what)
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad(set_to_none=True)
            cm.step()
            ref.step()


def _global_selection_worker(rank, world):
    _global_selection_body(rank, world, torch.device("cpu"), torch.float64, 1e-6)


def _random_and_layout_worker(rank, world):
    _global_random_worker(rank, world)
    _mismatched_shapes_worker(rank, world)


def _global_random_worker(rank, world):
    """selection='random', seed=None and no DDP: the ranks' streams differ, yet they agree on one uniformly
    random K-subset of the global batch, and the gradient mean is that of one process on the chosen rows."""
    from cggr.distributed import GlobalBatch

    model = _llama()
    torch.manual_seed(1000 + rank)  # seed=None draws each rank's stream seed from here: different streams
    cm = CGGRModel(model, selection="random", seed=None, global_selection=True, min_tokens_ratio=0.5,
                   warmup_steps=0)
    seeds = [torch.zeros((), dtype=torch.long) for _ in range(world)]
    dist.all_gather(seeds, cm.rng_seed.clone())
    assert len({int(s) for s in seeds}) == world
    ref_model = copy.deepcopy(cm.model)
    ids, labels, mask = _global_batch(world, 4, 11, seed=7)
    loss = cm(ids[rank], labels=labels[rank], attention_mask=mask[rank]).loss
    loss.backward()
    for p in cm.model.parameters():  # what DDP does
        dist.all_reduce(p.grad)
        p.grad /= world
    chosen = cm.get_metrics()["selected_indices"]
    every = [None] * world
    dist.all_gather_object(every, chosen)
    assert all(c == chosen for c in every) and len(set(chosen)) == 4, every
    idx = torch.tensor(chosen)
    ref = CGGRModel(ref_model, min_tokens_ratio=1.0, warmup_steps=0)
    sel = (ids.flatten(0, 1)[idx], labels.flatten(0, 1)[idx], mask.flatten(0, 1)[idx])
    ref_loss = ref(sel[0], labels=sel[1], attention_mask=sel[2]).loss
    ref_loss.backward()
    assert torch.allclose(_mean_over_ranks(loss), ref_loss, rtol=1e-6, atol=1e-6)
    _assert_grads(cm.model, ref_model, rtol=1e-6, atol=1e-6, what="random")
    # uniform over the global batch: every one of the W·B rows is chosen K/(W·B) of the time (chi-square)
    gb = GlobalBatch(None, rank, world, ids[rank], labels[rank], mask[rank], {})
    assert torch.equal(gb.rows()[0], ids.flatten(0, 1))
    gen = cm.random_generator()
    counts = torch.zeros(world * 4)
    draws = 400
    for _ in range(draws):
        counts[torch.topk(gb.random_scores(gen, torch.device("cpu")), 4).indices] += 1
    expected = draws * 4 / (world * 4)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30, (counts, chi2)  # 7 degrees of freedom: p ~ 1e-4, deterministic given the seeds


def _mismatched_shapes_worker(rank, world):
    cm = CGGRModel(_llama(), global_selection=True, min_tokens_ratio=0.5, warmup_steps=0, num_router_layers=1)
    t = 9 + rank  # padded to each rank's own longest sequence: a layout the ranks cannot exchange
    ids = torch.randint(0, V, (4, t))
    with pytest.raises(ValueError, match=r"same batch layout on every rank.*\[\[4, 9, 0, 0, 0, 0\], \[4, 10, 0"):
        cm(ids, labels=ids)
    mask = torch.ones(4, 9, dtype=torch.long) if rank == 0 else None  # a mask on one rank only
    with pytest.raises(ValueError, match="attention_mask on every rank or on none"):
        cm(ids[:, :9], labels=ids[:, :9], attention_mask=mask)


def test_global_selection_over_ddp_equals_one_process_on_the_concatenated_batch():
    """DDP, 2 ranks x 4 sequences: the 2k hardest of all 8 (warm-up: k = 4, 3, 2), each rank training on k of
    them, equal one process selecting K of the 8 (loss = mean of the ranks' losses, every gradient, the chosen
    sequences and kept tokens), across optimizer steps: by the router's scores with position_ids, with the
    hardest 40% of tokens, through the fused head, and by precomputed sequence scores."""
    run_gloo(_global_selection_worker)


def test_global_random_selection_without_a_common_seed_and_layout_checks():
    """The random control picks one uniformly random K-subset of the global batch although the ranks' streams
    differ; ranks whose batches cannot be exchanged (different lengths, a mask on one rank only) get a
    ValueError on every rank instead of a hang."""
    run_gloo(_random_and_layout_worker)


# --------------------------------------------------------------------------- DDP, seed=None, resume
def _ddp_random_resume_worker(rank, world, ckpt):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build(torch_seed):
        model = _llama()
        torch.manual_seed(torch_seed)  # seed=None draws the stream's seed here: different on every rank
        cm = CGGRModel(model, selection="random", seed=None, min_tokens_ratio=0.5, warmup_steps=0)
        return cm, DDP(cm)

    def run(cm, ddp, steps):
        chosen = []
        for step in steps:
            ids, labels, mask = _global_batch(world, 6, 8, seed=step)
            ddp(ids[rank], labels=labels[rank], attention_mask=mask[rank]).loss.backward()
            cm.step()
            chosen.append(cm.get_metrics()["selected_indices"])
        return chosen

    cm, ddp = build(10 + rank)
    straight = run(cm, ddp, range(4))
    cm, ddp = build(10 + rank)  # the same start, interrupted after 2 steps
    first = run(cm, ddp, range(2))
    if rank == 0:
        torch.save(cm.state_dict(), ckpt)
    dist.barrier()
    cm, ddp = build(30 + rank)  # a fresh process would draw yet another seed
    cm.load_state_dict(torch.load(ckpt))
    resumed = first + run(cm, ddp, range(2, 4))
    every = [None] * world
    dist.all_gather_object(every, (straight, resumed))
    # the stream is the rng_seed buffer's, which DDP broadcasts from rank 0: the same draws on every rank,
    # and a resumed run continues rank 0's stream exactly where it was saved
    for r, (s, res) in enumerate(every):
        assert res == s, f"rank {r}: resumed {res} != uninterrupted {s}"
        assert s == every[0][0], f"rank {r} draws {s}, rank 0 {every[0][0]}"


def test_ddp_seed_none_random_selection_follows_the_broadcast_seed_and_resumes(tmp_path):
    """DDP with seed=None: DDP broadcasts rank 0's ``rng_seed`` buffer; the random control must draw from it
    (it drew from each rank's own seed, so a run resumed from rank 0's checkpoint switched streams on rank 1)."""
    run_gloo(_ddp_random_resume_worker, str(tmp_path / "ckpt.pt"))


# --------------------------------------------------------------------------- FSDP2
def _fsdp2_body(rank, world, device, dtype, tol):
    from torch.distributed.fsdp import fully_shard

    ids, labels, mask = _global_batch(world, 4, 10, seed=3, device=device)
    kw = dict(num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0)

    def reference(extra):
        """Per-rank selection: the mean over ranks of one process per rank's batch (what FSDP computes)."""
        ref_model = _llama(dtype, device)
        ref = CGGRModel(ref_model, **kw, **extra)
        losses = []
        for r in range(world):
            loss = ref(ids[r], labels=labels[r], attention_mask=mask[r]).loss
            (loss / world).backward()
            losses.append(loss.detach())
        return ref_model, losses

    # (a) the HF model itself is the FSDP root, CGGRModel around it (the router used to crash copying it)
    model = _llama(dtype, device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with pytest.raises(ValueError, match=r"fully_shard\(CGGRModel\(model\)\)"):
        CGGRModel(model, fused_head=True, **kw)
    cm = CGGRModel(model, **kw)
    loss = cm(ids[rank], labels=labels[rank], attention_mask=mask[rank]).loss
    loss.backward()
    ref_model, ref_losses = reference({})
    assert torch.allclose(loss, ref_losses[rank], rtol=tol, atol=tol)
    _assert_grads(model, ref_model, rtol=tol, atol=tol, what="fully_shard(model)")
    # (b) CGGRModel as the root: the fused head runs on the head weight the root gathered
    model = _llama(dtype, device)
    for layer in model.model.layers:
        fully_shard(layer)
    cm = fully_shard(CGGRModel(model, fused_head=True, **kw))
    loss = cm(ids[rank], labels=labels[rank], attention_mask=mask[rank]).loss
    loss.backward()
    ref_model, ref_losses = reference({"fused_head": True})
    assert torch.allclose(loss, ref_losses[rank], rtol=tol, atol=tol)
    _assert_grads(model, ref_model, rtol=tol, atol=tol, what="fully_shard(CGGRModel(model)), fused head")
    # (c) global selection under FSDP2 equals one process on the concatenated batch
    model = _llama(dtype, device)
    for layer in model.model.layers:
        fully_shard(layer)
    cm = fully_shard(CGGRModel(model, global_selection=True, token_ratio=0.5, **kw))
    loss = cm(ids[rank], labels=labels[rank], attention_mask=mask[rank]).loss
    loss.backward()
    ref_model = _llama(dtype, device)
    ref = CGGRModel(ref_model, token_ratio=0.5, **kw)
    ref_loss = ref(ids.flatten(0, 1), labels=labels.flatten(0, 1), attention_mask=mask.flatten(0, 1)).loss
    ref_loss.backward()
    assert cm.get_metrics()["selected_indices"] == sorted(ref.get_metrics()["selected_indices"])
    assert torch.allclose(_mean_over_ranks(loss), ref_loss, rtol=tol, atol=tol)
    _assert_grads(model, ref_model, rtol=tol, atol=tol, what="FSDP2 global selection")


def _fsdp2_worker(rank, world):
    _fsdp2_body(rank, world, torch.device("cpu"), torch.float64, 1e-6)


def test_fsdp2_router_cggr_model_and_fused_head_match_the_unsharded_model():
    """FSDP2 on 2 ranks: (a) ``fully_shard`` on the HF model (root) with CGGRModel around it: the router works
    and loss/gradients equal the unsharded model's, while ``fused_head=True`` is refused with the arrangement
    that allows it; (b) that arrangement, ``fully_shard(CGGRModel(model))``, with the fused head; (c) global
    selection under FSDP2 against one process on the concatenated batch."""
    run_gloo(_fsdp2_worker)


# --------------------------------------------------------------------------- Accelerate
def _accelerate_worker(rank, world):
    from accelerate import Accelerator

    # torchrun/accelerate launch set these; the process group is already up (Accelerate then uses it)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert accelerator.num_processes == world and accelerator.process_index == rank
    model = _llama()
    ref_model = copy.deepcopy(model)
    kw = dict(num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=1)
    cm = CGGRModel(model, **kw)
    prepared, opt = accelerator.prepare(cm, torch.optim.SGD(cm.parameters(), lr=0.5))
    assert accelerator.unwrap_model(prepared) is cm
    ref = CGGRModel(ref_model, **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):  # optimizer steps, 2 micro-batches each (accumulated), curriculum advanced per step
        for micro in range(2):
            ids, labels, mask = _global_batch(world, 4, 9, seed=10 * step + micro)
            with accelerator.accumulate(prepared):
                loss = prepared(ids[rank], labels=labels[rank], attention_mask=mask[rank]).loss
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            for r in range(world):  # the reference: per-rank losses, averaged over ranks and micro-batches
                (ref(ids[r], labels=labels[r], attention_mask=mask[r]).loss / (2 * world)).backward()
        assert accelerator.sync_gradients
        ref_opt.step()
        ref_opt.zero_grad()
        accelerator.unwrap_model(prepared).step()
        ref.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-8), (step, name, (p - q).abs().max())
    assert cm.step_count.item() == 2 and cm.current_ratio == 0.5
    state = accelerator.get_state_dict(prepared)
    assert "step_count" in state and "rng_seed" in state and "model.lm_head.weight" in state


def test_accelerate_prepare_and_train_with_gradient_accumulation():
    """``accelerator.prepare(cggr_model)`` (DDP over gloo on 2 CPU processes), ``accumulate`` over 2
    micro-batches, ``accelerator.backward``, the curriculum advanced through ``unwrap_model``: the weights after
    two optimizer steps equal a single-process reference that averages the per-rank losses."""
    pytest.importorskip("accelerate")
    run_gloo(_accelerate_worker)


# --------------------------------------------------------------------------- LoRA (peft) under DDP
def _lora_llama():
    """A tiny fp32 Llama with random non-zero LoRA adapters (``init_lora_weights=False``: PEFT's default B = 0
    would make the adapters change nothing, and their gradients A = 0)."""
    from peft import LoraConfig, get_peft_model

    model = _llama(torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                        init_lora_weights=False)
    return get_peft_model(model, config)


def _peft_ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    rtol, atol = 1e-5, 1e-6  # fp32
    # fused_head=True: the fused selective head (torch path on the CPU) runs the base model past the PeftModel;
    # on CUDA auto mode takes it, so it is what DDP + LoRA runs there by default
    for global_selection, fused in ((False, False), (True, False), (False, True), (True, True)):
        peft_model = _lora_llama()
        ref_model = copy.deepcopy(peft_model)
        lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        ref_lora = {n: p for n, p in ref_model.named_parameters() if p.requires_grad}
        assert lora and all("lora_" in n for n in lora)
        base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
        init = {n: p.detach().clone() for n, p in lora.items()}
        # warm-up 1 -> 0.75 -> 0.5 over the three steps: k per rank 4, 3, 2
        kw = dict(num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=2, fused_head=fused)
        cm = CGGRModel(peft_model, global_selection=global_selection, **kw)
        ddp = DDP(cm)  # the README's recipe as it stands: no find_unused_parameters, no static_graph
        assert not ddp.find_unused_parameters
        ref = CGGRModel(ref_model, **kw)
        opt = torch.optim.SGD(list(lora.values()), lr=0.5)
        ref_opt = torch.optim.SGD(list(ref_lora.values()), lr=0.5)
        for step in range(3):
            what = f"global_selection={global_selection}, fused_head={fused}, step {step}"
            ids, labels, mask = _global_batch(world, 4, 11, seed=50 + 10 * global_selection + 20 * fused + step)
            loss = ddp(ids[rank], labels=labels[rank], attention_mask=mask[rank]).loss
            loss.backward()
            if global_selection:  # one process on the concatenated batch
                ref_loss = ref(ids.flatten(0, 1), labels=labels.flatten(0, 1), attention_mask=mask.flatten(0, 1)).loss
                ref_loss.backward()
                assert cm.get_metrics()["selected_indices"] == sorted(ref.get_metrics()["selected_indices"]), what
            else:  # one process per rank's rows, gradients averaged (what DDP computes)
                ref_losses = []
                for r in range(world):
                    r_loss = ref(ids[r], labels=labels[r], attention_mask=mask[r]).loss
                    (r_loss / world).backward()
                    ref_losses.append(r_loss.detach())
                    if r == rank:
                        want = ref.get_metrics()["selected_indices"]
                assert cm.get_metrics()["selected_indices"] == want, what
                assert torch.allclose(loss, ref_losses[rank], rtol=rtol, atol=atol), (what, loss, ref_losses)
                ref_loss = torch.stack(ref_losses).mean()
            assert torch.allclose(_mean_over_ranks(loss), ref_loss, rtol=rtol, atol=atol), (what, loss, ref_loss)
            for name, p in lora.items():
                g, want_g = p.grad, ref_lora[name].grad
                assert g is not None and want_g is not None and want_g.abs().max() > 0, (what, name)
                assert torch.allclose(g, want_g, rtol=rtol, atol=atol), (what, name, (g - want_g).abs().max())
            assert all(p.grad is None for n, p in peft_model.named_parameters() if n not in lora), what
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad(set_to_none=True)
            cm.step()
            ref.step()
            flat = torch.cat([p.detach().flatten() for p in lora.values()])
            every = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(every, flat)
            assert all(torch.equal(e, every[0]) for e in every), what  # the same adapters on every rank
            for name, p in lora.items():
                q = ref_lora[name]
                assert torch.allclose(p, q, rtol=rtol, atol=atol), (what, name, (p - q).abs().max())
            for name, p in peft_model.named_parameters():
                if name not in lora:
                    assert not p.requires_grad and torch.equal(p, base[name]), (what, name)
        assert int(cm.step_count) == 3 and cm.current_ratio == 0.5
        assert all(not torch.equal(p, init[n]) for n, p in lora.items())  # every adapter trained


def test_lora_under_ddp_equals_one_process():
    """``DDP(CGGRModel(get_peft_model(llama, LoraConfig(...))))`` on 2 ranks, random non-zero adapters, 3 SGD steps
    through the warm-up, DDP as the README builds it (no ``find_unused_parameters``), logits path and fused head:
    per-rank selection against one process per rank's rows (gradients averaged), global selection against one
    process on the concatenated batch. Each step: the chosen rows, the loss, every LoRA gradient (non-zero: none
    unused), no gradient on a base weight; after each step the adapters are identical on both ranks and equal the
    reference's, the frozen base weights unchanged."""
    pytest.importorskip("peft")
    run_gloo(_peft_ddp_worker)


# --------------------------------------------------------------------------- single process
def test_wrapped_model_warns_once_that_the_fused_head_is_off():
    """Auto mode (``fused_head=None``) on CUDA with a wrapper between CGGRModel and the model: the unfused path
    is taken with a warning that names the arrangement keeping the fused head (checked without a GPU: the
    decision only reads the device type)."""
    cm = CGGRModel(nn.DataParallel(_llama(torch.float32)), num_router_layers=1)
    with pytest.warns(UserWarning, match=r"fused head off.*DataParallel\(CGGRModel\(model\)\)"):
        assert cm._fused_for(torch.device("cuda")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cm._fused_for(torch.device("cuda")) is None  # once
    plain = CGGRModel(_llama(torch.float32), num_router_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain._fused_for(torch.device("cuda")) is not None
