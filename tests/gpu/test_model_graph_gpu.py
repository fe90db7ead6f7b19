"""A whole CGGRModel training step captured in one CUDA graph equals the eager step (docs/cuda_graphs.md).

The captured step: router forward (no grad) + scoring + sequence selection (topk, or the counter-RNG 'random'
control) + gather + full forward on the k selected sequences with the loss (the fused Triton linear-CE head by
default on CUDA, or the plain logits path) + backward + fused AdamW with ``capturable=True``.

Protocol of each check, per step i on a fresh batch: snapshot the state (parameters, optimizer state, the
curriculum's ``rng_counter``), run the eager step, record its loss, selected sequences and parameter update,
restore the snapshot, copy the same batch into the static inputs and replay the graph; the replay must give the
same loss, the same sequences and the same update. Replays therefore start from the state of the previous replay,
so a graph that froze anything at capture time (a ratio, a random draw, a mask) would disagree on later steps.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cggr import CGGRModel  # noqa: E402
from cggr._rng import CounterRNG  # noqa: E402

pytestmark = pytest.mark.cuda

B, T, V = 8, 40, 503
RATIO = 0.25  # k = 2 of 8
SEED = 1234


def _llama(dtype: torch.dtype, attn: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).train()


def _batch(i: int, padded: bool, with_mask: bool = True) -> dict[str, torch.Tensor]:
    """Batch i: random ids; with ``padded``, -100 labels, one row with no target and (``with_mask``) right padding."""
    g = torch.Generator(device="cuda").manual_seed(100 + i)
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    labels = ids.clone()
    out = {"input_ids": ids, "labels": labels}
    if padded:
        mask = torch.ones_like(ids)
        if i % 2 == 0:  # odd batches keep an all-ones mask: the same graph must handle both
            mask[1, T - 13:] = 0
            mask[4, T // 2:] = 0
            mask[6, 3:] = 0
        labels[2, :9] = -100
        labels[5, 7 + i] = -100
        labels[3] = -100  # no valid target: its score is -inf, never selected while others remain
        if with_mask:
            out["attention_mask"] = mask
    return out


def _hf_mask_capturable(model) -> str | None:
    """``None`` if the model's own forward with a padding mask can be captured, else transformers' error.

    Some transformers versions build the attention mask with host-to-device copies (5.17's eager mask:
    ``torch.tensor(0.0, device=...)``; SDPA's causal-skip test reads the mask on the host): no CUDA graph of a
    padded batch is possible there, whatever cggr does.
    """
    ids = torch.zeros((2, 8), dtype=torch.long, device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                model(input_ids=ids, attention_mask=mask)
        except RuntimeError as err:
            if "capture" not in str(err):
                raise
            return str(err).splitlines()[0]
    return None


def _state_tensors(cm: CGGRModel, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    opt_state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return [*cm.model.parameters(), *opt_state, cm.rng_counter, cm.step_count]


def _snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


@torch.no_grad()
def _restore(tensors: list[torch.Tensor], snap: list[torch.Tensor]) -> None:
    for t, s in zip(tensors, snap, strict=True):
        t.copy_(s)


def _flat_params(cm: CGGRModel) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in cm.model.parameters()])


def _capture(body, static: dict[str, torch.Tensor], opt: torch.optim.Optimizer):
    """PyTorch's whole-network recipe: warm-up on a side stream, grads set to None, capture once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # Triton compilation, cuBLAS workspaces, the optimizer's state
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body(static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    opt.zero_grad(set_to_none=True)  # the captured backward writes fresh .grad tensors from the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on any host sync or uncapturable call inside the step
        outputs = body(static)
    torch.cuda.synchronize()
    return graph, outputs


def _check_graph_matches_eager(
    cm: CGGRModel, opt: torch.optim.Optimizer, padded: bool, steps: int = 4, with_mask: bool = True
) -> list:
    """Capture the step, then compare ``steps`` replays with eager steps; returns the selected index lists."""
    dtype = next(cm.model.parameters()).dtype
    k = cm.num_selected_sequences(B)

    def body(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss = cm(batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask")).loss
        loss.backward()
        opt.step()
        return loss.detach(), cm._last["indices"]  # the (k,) selection, rewritten by every replay

    static = {name: t.clone() for name, t in _batch(-1, padded, with_mask).items()}
    graph, (static_loss, static_idx) = _capture(body, static, opt)

    state = _state_tensors(cm, opt)
    rtol = 1e-5 if dtype == torch.float32 else 2e-3
    upd_tol = 1e-4 if dtype == torch.float32 else 5e-2
    selected = []
    for i in range(steps):
        batch = _batch(i, padded, with_mask)
        snap = _snapshot(state)
        before = _flat_params(cm)
        counter = int(cm.rng_counter)

        opt.zero_grad(set_to_none=True)  # eager reference from the same state
        eager_loss, eager_idx = (t.clone() for t in body(batch))
        eager_update = _flat_params(cm) - before
        eager_counter = int(cm.rng_counter)

        _restore(state, snap)
        for name, t in batch.items():
            static[name].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        graph_update = _flat_params(cm) - before

        assert int(cm.rng_counter) == eager_counter, (i, int(cm.rng_counter), eager_counter)
        assert static_idx.shape == (k,)
        assert sorted(static_idx.tolist()) == sorted(eager_idx.tolist()), (i, static_idx, eager_idx)
        torch.testing.assert_close(static_loss, eager_loss, rtol=rtol, atol=1e-6)
        assert torch.isfinite(static_loss) and static_loss > 0
        if padded:
            assert 3 not in static_idx.tolist()  # the row without targets is never selected
        assert eager_update.norm() > 0  # the step trains
        rel = (graph_update - eager_update).norm() / eager_update.norm()
        assert rel < upd_tol, (i, float(rel))
        selected.append((counter, sorted(static_idx.tolist())))
    return selected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_graphed_topk_step_matches_eager_with_padding(dtype, fused_head, with_mask):
    if fused_head:
        pytest.importorskip("triton")
    # padded: eager attention, whose mask never depends on the data (SDPA's causal-skip test reads the mask on the
    # host); unpadded: SDPA's causal kernel (transformers 5.17 builds even the unpadded eager mask with a host copy)
    model = _llama(dtype, "eager" if with_mask else "sdpa")
    if with_mask and (err := _hf_mask_capturable(model)) is not None:
        pytest.skip(f"transformers {transformers.__version__} cannot capture a padded forward: {err}")
    cm = CGGRModel(model, num_router_layers=2, min_tokens_ratio=RATIO, warmup_steps=0, fused_head=fused_head)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    selected = _check_graph_matches_eager(cm, opt, padded=True, with_mask=with_mask)
    assert len({tuple(s) for _, s in selected}) > 1  # the selection follows the data, not the capture batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_random_step_advances_counter_rng(dtype):
    pytest.importorskip("triton")
    model = _llama(dtype, "sdpa")
    cm = CGGRModel(model, min_tokens_ratio=RATIO, warmup_steps=0, selection="random", seed=SEED)
    assert cm.rng_counter.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    selected = _check_graph_matches_eager(cm, opt, padded=False, steps=5)
    k = cm.num_selected_sequences(B)
    for j, (counter, idx) in enumerate(selected):
        # replay j drew with counter c_j = c_0 + j (one draw per step) and picked the first k of that permutation
        assert counter == selected[0][0] + j
        ref = CounterRNG(SEED, torch.tensor(counter)).permutation(B, "cpu")[:k]
        assert idx == sorted(ref.tolist()), (j, idx, ref)
    assert len({tuple(s) for _, s in selected}) > 1


def test_cpu_counter_is_refused_during_capture():
    rng = CounterRNG(7, torch.zeros((), dtype=torch.long))  # a CPU counter would freeze the draw into the graph
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CPU tensor while a CUDA graph"), torch.cuda.graph(graph):
        rng.uniform((16,), "cuda")
