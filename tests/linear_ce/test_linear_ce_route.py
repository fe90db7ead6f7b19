"""``cggr.linear_ce.plan.choose_route``: the one decision of which linear cross-entropy kernel runs and in which mode.

Every row of the table in that module's docstring, checked on the route itself (no kernel is launched; the
kernels' results on each route are checked against fp64 references in the *_interpret.py modules).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from cggr.kernels import linear_cross_entropy as lce
from cggr.kernels import linear_cross_entropy_fused as fz
from cggr.kernels import linear_cross_entropy_fused_split as sp
from cggr.linear_ce import torch_path
from cggr.linear_ce.options import LinearCrossEntropyOptions
from cggr.linear_ce.plan import (
    GRADS_IN_FORWARD,
    HIDDEN_GRAD_IN_FORWARD,
    OUTPUTS,
    STATS,
    Needs,
    Plan,
    choose_route,
)

ALL = Needs(hidden=True, weight=True, bias=False)
NONE = Needs(hidden=False, weight=False, bias=False)


def _route(needs=ALL, impl="triton", ratio=1.0, n=64, h=32, v=300, **opts):
    plan = Plan(impl=impl, ratio=ratio, scoring="combined", selection="topk", ignore_index=-100, softcap=None,
                reduction="mean", options=LinearCrossEntropyOptions(**opts), target_shape=(n,))
    return choose_route(plan, needs, torch.zeros(n, h), torch.zeros(v, h))


def test_torch_path_always_computes_stats_then_the_compact_rows():
    for ratio in (1.0, 0.5):
        for needs in (ALL, NONE):
            r = _route(needs, impl="torch", ratio=ratio, kernel="fused")
            assert (r.kernel, r.forward, r.all_rows) == ("torch", STATS, False)
            assert (r.forward_fn, r.backward_fn) == (torch_path.forward_stats, torch_path.backward_selected)


def test_chunked_kernel_computes_the_gradients_in_the_forward_when_every_token_is_kept():
    r = _route()
    assert (r.kernel, r.forward, r.all_rows, r.forward_fn, r.backward_fn) == (
        "chunked", GRADS_IN_FORWARD, True, lce.forward_stats, None)
    assert _route(Needs(hidden=False, weight=False, bias=True)).forward == GRADS_IN_FORWARD  # any gradient
    for needs, ratio in ((NONE, 1.0), (ALL, 0.5)):  # no gradient wanted, or a selection: stats, then compact rows
        r = _route(needs, ratio=ratio)
        assert (r.kernel, r.forward, r.all_rows, r.backward_fn) == ("chunked", STATS, False, lce.backward_selected)
    assert r.options.accumulate == "auto"  # only the fused kernel resolves it


def test_outputs_workspace_needs_every_token_kept_and_the_weight_gradient():
    r = _route(workspace="outputs")
    assert (r.kernel, r.forward, r.all_rows) == ("chunked", OUTPUTS, True)
    assert (r.forward_fn, r.backward_fn) == (lce.outputs_forward_stats, lce.outputs_backward)
    assert r.outputs_sched == lce.outputs_schedule(64, 32, 300, 4)
    r = _route(Needs(hidden=True, weight=False, bias=False), workspace="outputs")  # frozen head: its buffer path
    assert (r.forward, r.options.workspace) == (GRADS_IN_FORWARD, "outputs") and r.outputs_sched is None
    assert _route(ratio=0.5, workspace="outputs").forward == STATS


def test_outputs_workspace_without_a_schedule_runs_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(lce, "OUTPUTS_MAX_CHUNKS", 1)  # N >> H: more chunks than allowed
    shape = dict(n=4096, h=64, v=1000)
    assert lce.outputs_schedule(4096, 64, 1000, 4) is None
    for needs in (ALL, NONE):
        r = _route(needs, workspace="outputs", **shape)
        assert (r.kernel, r.forward, r.all_rows, r.forward_fn) == ("fused", STATS, True, fz.forward_stats)
        assert (r.options.kernel, r.options.workspace, r.options.accumulate) == ("fused", "buffer", "native")
    assert _route(ratio=0.5, workspace="outputs", **shape).kernel == "chunked"  # a selection: no 'outputs' path


@pytest.mark.parametrize("bwd,module", [("tiled", fz), ("split", sp), ("split_fwd", sp)])
def test_fused_kernel_backward_schedule_and_resolved_accumulation(bwd, module):
    for ratio, all_rows in ((0.5, False), (1.0, True)):
        r = _route(Needs(hidden=False, weight=True, bias=False), ratio=ratio, kernel="fused", bwd=bwd,
                   accumulate="auto", filter_eps=2**-12 if bwd != "split_fwd" else None)
        assert (r.kernel, r.forward, r.all_rows, r.forward_fn) == ("fused", STATS, all_rows, fz.forward_stats)
        assert r.backward_fn.func is module.backward_selected
        assert r.backward_fn.keywords == dict(accumulate="native", filter_eps=r.options.filter_eps)  # CPU: 'native'
        assert r.options.accumulate == "native"
    assert _route(kernel="fused", bwd=bwd, accumulate="fp32").backward_fn.keywords["accumulate"] == "fp32"


def test_split_fwd_accumulates_the_hidden_gradient_in_the_forward_only_where_it_can():
    r = _route(kernel="fused", bwd="split_fwd")
    assert (r.forward, r.all_rows, r.forward_fn) == (HIDDEN_GRAD_IN_FORWARD, True, sp.forward_with_hidden_grad)
    assert r.backward_fn.func is sp.backward_selected  # d_weight (and d_bias) in the backward
    no_dh = (dict(needs=Needs(hidden=False, weight=True, bias=False)), dict(ratio=0.5), dict(filter_eps=1e-3),
             dict(needs=NONE))
    for kw in no_dh:
        assert _route(kernel="fused", bwd="split_fwd", **kw).forward == STATS, kw
