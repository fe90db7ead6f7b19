"""Token-routed MoE MLP (``PersistentTRMLP``) with CGGR null routing.

Shape legend: B batch, T sequence, N = B·T tokens, d hidden, I expert intermediate, Hc columns of ``expert_w1``
(2I for SwiGLU: gate columns then up columns; I otherwise), E experts, k = ``top_k`` slots per token,
M = N·k (token, slot) pairs.

Routing (always fp32, fp64 for an fp64 layer): ``p = softmax(x @ routerᵀ)`` over E, the top-k experts per token,
their probabilities renormalised to sum 1 (``w``). ``y[t] = Σ_slot w[t, slot] · expert_{e(t, slot)}(x[t])`` with
``expert_e(x) = act(x @ w1[e]) @ w2[e]`` (SwiGLU: ``silu(x @ gate) * (x @ up)``).

Null routing: ``token_mask`` (bool, True = route) sends the other tokens to the sentinel expert E; they get y = 0,
no gradient through the experts, and take no part in the routing statistics or the auxiliary loss: their inputs
are replaced by 0 (a select) before the router GEMM, so NaN/inf values there change nothing at all.

Dataflow (no host synchronisation on the Triton and ``torch._grouped_mm`` paths): the M (token, slot) pairs are
sorted by expert id on the device (sentinel pairs sort last); the group offsets (E+1,) stay on the device; gather
rows → grouped GEMM up → activation → grouped GEMM down → routing weight → deterministic sum over the k slots.
The Triton path (:mod:`cggr.kernels.grouped_gemm`) does each grouped GEMM as one persistent launch with the gather,
activation and weighted scatter fused, and routes with :mod:`cggr.kernels.moe_routing` (after the router GEMM:
softmax, top-k, counting sort by expert, aux and z losses in three launches, one for the router backward); the
torch path does the same dataflow with ``torch._grouped_mm`` (CUDA sm90+, bf16) or, elsewhere, with a loop over
experts (it reads the offsets on the host: the fallback only). Top-k ties (equal logits, frequent in bf16) go to
the lowest expert index on both paths.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cggr._autocast import autocast_dtype
from cggr._dispatch import IMPLS, Impl, resolve_impl
from cggr._validation import check_choice
from cggr.kernels.grouped_gemm import GroupedMLPOptions, grouped_expert_mlp

__all__ = [
    "ACTIVATIONS",
    "PersistentTRMLP",
    "RoutingPlan",
    "aux_losses",
    "create_persistent_tr_mlp",
    "expert_mlp_torch",
    "route_tokens",
]

ACTIVATIONS = ("swiglu", "silu", "gelu")


class RoutingPlan(NamedTuple):
    """Everything the expert computation needs, all on the device of ``x``."""

    logits: torch.Tensor  # (N, E) router logits, fp32 (fp64 for fp64 input)
    probs: torch.Tensor  # (N, E) softmax(logits)
    top_idx: torch.Tensor  # (N, k) long, chosen experts
    top_w: torch.Tensor  # (N, k) renormalised routing weights
    routed: torch.Tensor  # (N,) bool, False = null-routed
    counts: torch.Tensor  # (E+1,) int32, pairs per expert; counts[E] = null-routed pairs
    offs: torch.Tensor  # (E+1,) int32 group offsets of the sorted rows; offs[E] = routed pairs
    order: torch.Tensor  # (M,) long, sorted row -> (token, slot) pair index
    tok: torch.Tensor  # (M,) long, sorted row -> token
    pair: torch.Tensor  # (M,) long, sorted row -> pair index t·k + slot (the same tensor as order)
    weights: torch.Tensor  # (M,) routing weight of each sorted row (differentiable)
    all_routed: bool  # no token_mask was given (known on the host: no masking work needed)
    balance: torch.Tensor | None = None  # fused routing only: E·Σ f_e·P_e (differentiable), else None
    z: torch.Tensor | None = None  # fused routing only: router z-loss (differentiable), else None


def route_tokens(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
                 token_mask: torch.Tensor | None = None, impl: Impl = "torch") -> RoutingPlan:
    """Route (N, d) tokens: fp32 softmax, top-k, renormalise, sort the pairs by expert on the device.

    The top-k experts are those of the k largest logits, the lowest expert index first among equal logits
    (a stable descending sort; ``torch.topk`` documents no order for ties). ``impl='triton'`` (or ``'auto'`` on
    CUDA bf16/fp16 with triton) runs everything after the router GEMM in the fused kernels of
    :mod:`cggr.kernels.moe_routing`: the same experts, weights (to fp32 rounding) and sorted rows, int32 indices,
    logits left in x's dtype, ``top_w``/``probs`` without gradient, and ``balance``/``z`` filled in.
    """
    n_tok = x.shape[0]
    n_exp = router_weight.shape[0]
    use_triton = _resolve_impl(impl, x, "route_tokens") == "triton"  # also checks impl
    logits = F.linear(x, router_weight)  # (N, E)
    if use_triton:
        from cggr.kernels.moe_routing import fused_route

        weights, balance, z, probs, top_idx, top_w, counts, offs, tok, pair = fused_route(logits, top_k, token_mask)
        routed = token_mask if token_mask is not None else torch.ones(n_tok, dtype=torch.bool, device=x.device)
        return RoutingPlan(logits, probs, top_idx, top_w, routed, counts, offs, pair, tok, pair, weights,
                           token_mask is None, balance, z)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = logits.softmax(-1)  # (N, E)
    top_idx = torch.sort(logits, dim=-1, descending=True, stable=True)[1][:, :top_k]  # (N, k)
    top_p = probs.gather(-1, top_idx)  # (N, k)
    top_w = top_p / top_p.sum(-1, keepdim=True)
    if token_mask is None:
        routed = torch.ones(n_tok, dtype=torch.bool, device=x.device)
        expert_pair = top_idx.reshape(-1)  # (M,)
    else:
        routed = token_mask
        expert_pair = torch.where(routed[:, None], top_idx, n_exp).reshape(-1)  # (M,), sentinel E for null tokens
    sorted_e, order = torch.sort(expert_pair, stable=True)  # (M,), order: sorted row -> pair
    # offs[e] = first sorted row with expert >= e; offs[E] = routed pairs (no host sync, unlike bincount)
    offs = torch.searchsorted(sorted_e, torch.arange(n_exp + 1, device=x.device), out_int32=True)
    counts = torch.diff(offs, append=offs.new_full((1,), expert_pair.shape[0]))  # (E+1,)
    weights = top_w.reshape(-1)[order]  # (M,)
    return RoutingPlan(logits, probs, top_idx, top_w, routed, counts, offs, order, order // top_k, order, weights,
                       token_mask is None)


def aux_losses(plan: RoutingPlan, top_k: int, with_z: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load-balancing loss ``E · Σ_e f_e · P_e`` and router z-loss ``mean(logsumexp(logits)²)``, routed tokens only.

    ``f_e`` = share of the routed (token, slot) pairs sent to expert e (no gradient), ``P_e`` = mean router
    probability of e over routed tokens. Both are 0 (with gradient) when no token is routed. Equal to 1 for a
    perfectly balanced router with uniform probabilities, ``top_k``-independent. z is None unless ``with_z``.
    """
    n_exp, n_tok = plan.probs.shape[1], plan.probs.shape[0]
    counts = plan.counts[:n_exp].to(plan.probs.dtype)  # (E,)
    lse2 = torch.logsumexp(plan.logits, -1).square() if with_z else None  # (N,)
    if plan.all_routed:  # fewer launches when every token is routed
        balance = torch.dot(counts, plan.probs.sum(0)) * (n_exp / (max(n_tok, 1) ** 2 * top_k))
        return balance, (lse2.sum() / max(n_tok, 1) if with_z else None)
    routed = plan.routed.to(plan.probs.dtype)  # (N,)
    n_routed = routed.sum().clamp_min(1.0)
    f = counts / (n_routed * top_k)  # (E,)
    p_mean = (plan.probs * routed[:, None]).sum(0) / n_routed  # (E,)
    balance = n_exp * (f * p_mean).sum()
    z = (lse2 * routed).sum() / n_routed if with_z else None
    return balance, z


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.silu(h) if activation == "silu" else F.gelu(h)


def _grouped_mm_ok(x: torch.Tensor, *mats: torch.Tensor) -> bool:
    """torch._grouped_mm needs CUDA sm90+, bf16 and 16-byte-aligned row strides."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(m.shape[-1] % 8 == 0 for m in (x, *mats)))


def _grouped(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """Sorted rows (M, K) times per-expert (E, K, N) -> (M, N); rows past offs[E] are undefined (grouped_mm) or 0."""
    if use_grouped_mm:
        return torch._grouped_mm(a, w, offs=offs[1:])
    bounds = offs.tolist()  # host sync: the per-expert loop fallback only
    pieces = [a[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])]  # (n_e, N) each
    pieces.append(a.new_zeros(a.shape[0] - bounds[-1], w.shape[2]))  # null-routed rows
    return torch.cat(pieces)


def expert_mlp_torch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, plan: RoutingPlan, top_k: int,
                     activation: str, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """The Triton dataflow in plain PyTorch (autograd through every op): the CPU path and the test oracle.

    Args:
        x: (N, d) tokens. w1: (E, d, Hc). w2: (E, I, d). plan: from :func:`route_tokens`.
        use_grouped_mm: force ``torch._grouped_mm`` (True) or the per-expert loop (False); None picks
            ``torch._grouped_mm`` where it runs (CUDA sm90+, bf16, aligned sizes).

    Returns:
        (N, d) expert output; 0 for null-routed tokens.
    """
    if use_grouped_mm is None:
        use_grouped_mm = _grouped_mm_ok(x, w1, w2)
    masked = not plan.all_routed
    # rows past offs[E] (null-routed pairs) are undefined in torch._grouped_mm's output and input gradient:
    # torch.where (a select, never a multiply) keeps that garbage out of every value and gradient.
    valid = (torch.arange(plan.tok.shape[0], device=x.device) < plan.offs[-1])[:, None] if masked else None
    xs = x[plan.tok]  # (M, d) gathered rows in expert order
    if masked:
        xs = torch.where(valid, xs, 0)
    h = _grouped(xs, w1, plan.offs, use_grouped_mm)  # (M, Hc)
    a = _activate(h, activation)  # (M, I)
    if masked:
        a = torch.where(valid, a, 0)
    o = _grouped(a, w2, plan.offs, use_grouped_mm)  # (M, d)
    if masked:
        o = torch.where(valid, o, 0)
    o = o * plan.weights[:, None].to(o.dtype)
    inverse = torch.empty_like(plan.order)
    inverse[plan.order] = torch.arange(plan.order.shape[0], device=x.device)
    y = o[inverse].view(x.shape[0], top_k, o.shape[-1]).sum(1)  # (N, d): pair order, deterministic sum over slots
    return torch.where(plan.routed[:, None], y, 0) if masked else y


#: dtypes of the MoE Triton kernels (grouped_expert_mlp): fp32 and fp64 layers run the torch path under 'auto'
TRITON_MOE_DTYPES = (torch.bfloat16, torch.float16)


def _resolve_impl(impl: str, x: torch.Tensor, op: str) -> str:
    """``'torch'`` or ``'triton'`` for the MoE layer through the project's one dispatcher (docs/design.md §6).

    Triton needs CUDA bf16/fp16 ``x``; ``interpretable=False``: the kernel entry takes CUDA tensors only and the
    interpreter's ``tl.dot`` is wrong for bf16, so ``TRITON_INTERPRET=1`` leaves CPU tensors on the torch path
    (tests/kernels/test_moe_triton_interpret.py calls the kernels themselves).
    """
    return resolve_impl(impl, x, op=op, dtypes=TRITON_MOE_DTYPES, interpretable=False)


class PersistentTRMLP(nn.Module):
    """Token-routed mixture-of-experts MLP whose experts run as persistent grouped GEMMs.

    Args:
        hidden_dim: d, the model width.
        intermediate_dim: I, the width of each expert's hidden layer.
        num_experts: E.
        top_k: experts per token (1 <= top_k <= E).
        activation: ``'swiglu'`` (``expert_w1`` holds gate then up columns), ``'silu'`` or ``'gelu'`` (exact).
        aux_loss_coef: weight of the load-balancing loss in the returned ``aux_loss``. With the default 1.0 the
            returned value is the plain Switch loss ``E · Σ_e f_e · P_e`` (add ``0.01 * aux_loss`` to your loss).
        z_loss_coef: weight of the router z-loss ``mean over routed tokens of logsumexp(logits)²`` (0 = off).
        impl: ``'auto'`` (Triton on CUDA bf16/fp16 when importable, else torch), ``'torch'`` or ``'triton'``
            (RuntimeError without triton or off CUDA, TypeError on another dtype), decided per forward by
            :func:`cggr._dispatch.resolve_impl`; the environment variable ``CGGR_IMPL=torch`` forces the torch path.
        kernel_options: tile configuration of the Triton kernels.
        device, dtype: of the parameters.

    ``forward(x, token_mask=None) -> (y, aux_loss)`` with x (B, T, d) or (N, d), y of the same shape and dtype,
    ``aux_loss = aux_loss_coef · E·Σ f_e·P_e + z_loss_coef · z_loss`` (fp32 scalar, over routed tokens only).
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, num_experts: int = 8, top_k: int = 2,
                 activation: str = "swiglu", aux_loss_coef: float = 1.0, z_loss_coef: float = 0.0,
                 impl: Impl = "auto", kernel_options: GroupedMLPOptions | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value, minimum in (("hidden_dim", hidden_dim, 1), ("intermediate_dim", intermediate_dim, 1),
                                     ("num_experts", num_experts, 1), ("top_k", top_k, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_choice("impl", impl, IMPLS)
        for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.hidden_dim, self.intermediate_dim = hidden_dim, intermediate_dim
        self.num_experts, self.top_k, self.activation = num_experts, top_k, activation
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.impl = impl
        self.kernel_options = kernel_options or GroupedMLPOptions()
        kw = {"device": device, "dtype": dtype}
        hc = 2 * intermediate_dim if activation == "swiglu" else intermediate_dim
        self.router = nn.Linear(hidden_dim, num_experts, bias=False, **kw)
        self.expert_w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, hc, **kw))  # (E, d, Hc)
        self.expert_w2 = nn.Parameter(torch.empty(num_experts, intermediate_dim, hidden_dim, **kw))  # (E, I, d)
        self.reset_parameters()
        self._last_counts: torch.Tensor | None = None
        self._last_aux: torch.Tensor | None = None
        self._last_tokens = 0

    def reset_parameters(self) -> None:
        """nn.Linear's default scale: U(±1/sqrt(fan_in)) for each expert matrix."""
        self.router.reset_parameters()
        bound1, bound2 = 1.0 / math.sqrt(self.hidden_dim), 1.0 / math.sqrt(self.intermediate_dim)
        with torch.no_grad():
            self.expert_w1.uniform_(-bound1, bound1)
            self.expert_w2.uniform_(-bound2, bound2)

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
                f"aux_loss_coef={self.aux_loss_coef}, z_loss_coef={self.z_loss_coef}, impl={self.impl!r}")

    def _check_input(self, x: object, token_mask: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_dim:
            raise ValueError(f"x must be (N, {self.hidden_dim}) or (B, T, {self.hidden_dim}), got {tuple(x.shape)}")
        if x.dtype != self.expert_w1.dtype and autocast_dtype(x) is None:
            raise TypeError(
                f"x dtype {x.dtype} does not match the layer's parameter dtype {self.expert_w1.dtype} "
                f"(cast one of them, or run under torch.autocast)"
            )
        if token_mask is None:
            return
        if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
            got = token_mask.dtype if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
            raise TypeError(f"token_mask must be a bool tensor (True = route), got {got}")
        if tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} does not match x's token shape "
                             f"{tuple(x.shape[:-1])}")
        if token_mask.device != x.device:
            raise ValueError(f"token_mask is on {token_mask.device} but x is on {x.device}")

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Route, run the experts, return ``(y, aux_loss)``; y has x's shape, null-routed tokens get 0."""
        self._check_input(x, token_mask)
        shape = x.shape
        # under torch.autocast the layer computes in the autocast dtype like nn.Linear does: input, router and
        # expert weights cast to it (the casts are differentiable: fp32 parameters get fp32 gradients)
        dtype = autocast_dtype(x) or self.expert_w1.dtype
        x2 = x.reshape(-1, self.hidden_dim).to(dtype)  # (N, d)
        w_router, w1, w2 = (w.to(dtype) for w in (self.router.weight, self.expert_w1, self.expert_w2))
        mask = None if token_mask is None else token_mask.reshape(-1)
        if mask is not None:
            # null-routed tokens take no part: a select (never a multiply) gives them 0 before the router GEMM, so
            # a NaN/inf there reaches neither the routing statistics, aux_loss, nor any gradient (0 · NaN = NaN)
            x2 = torch.where(mask[:, None], x2, 0)
        impl = _resolve_impl(self.impl, x2, "PersistentTRMLP")
        empty = x2.shape[0] == 0
        if empty:  # no token: the torch path's per-expert loop runs empty GEMMs; aux_loss is 0 (with gradient)
            impl = "torch"
        route_impl = "triton" if impl == "triton" and self.kernel_options.fused_routing else "torch"
        plan = route_tokens(x2, w_router, self.top_k, mask, impl=route_impl)
        if impl == "triton":
            y = grouped_expert_mlp(x2, w1, w2, plan.weights, plan.tok, plan.pair,
                                   plan.offs, None if plan.all_routed else plan.routed, top_k=self.top_k,
                                   activation=self.activation, options=self.kernel_options)
        else:
            y = expert_mlp_torch(x2, w1, w2, plan, self.top_k, self.activation, use_grouped_mm=False if empty else None)
        if plan.balance is not None:  # fused routing computed both terms
            balance, z = plan.balance, plan.z
        else:
            balance, z = aux_losses(plan, self.top_k, with_z=bool(self.z_loss_coef))
        aux = self.aux_loss_coef * balance
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * z
        self._last_counts = plan.counts.detach()
        self._last_aux = aux.detach()
        self._last_tokens = x2.shape[0]
        return y.reshape(shape), aux

    def get_metrics(self) -> dict[str, object]:
        """Per-expert load of the last forward (reads the device values now, lazily)."""
        if self._last_counts is None:
            return {"num_experts": self.num_experts, "top_k": self.top_k, "tokens_total": 0}
        counts = self._last_counts.cpu().tolist()
        routed_pairs = sum(counts[:-1])
        load = [c / routed_pairs if routed_pairs else 0.0 for c in counts[:-1]]
        mean = 1.0 / self.num_experts
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens_total": self._last_tokens,
            "tokens_routed": routed_pairs // self.top_k,
            "null_routed_fraction": (counts[-1] // self.top_k) / self._last_tokens if self._last_tokens else 0.0,
            "expert_tokens": counts[:-1],
            "expert_load": load,
            "load_imbalance": max(load) / mean if routed_pairs else 0.0,
            "aux_loss": float(self._last_aux),
        }


def create_persistent_tr_mlp(hidden_dim: int, intermediate_dim: int, num_experts: int = 8, top_k: int = 2,
                             **kwargs: object) -> PersistentTRMLP:
    """Build a :class:`PersistentTRMLP` (the seed's factory; keyword arguments pass through)."""
    return PersistentTRMLP(hidden_dim, intermediate_dim, num_experts=num_experts, top_k=top_k, **kwargs)
