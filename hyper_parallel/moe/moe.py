"""The MoE layer: router -> reorderer -> (dispatch) -> experts -> (combine) -> weighted sum, plus shared experts.

Shape legend: ``T`` tokens, ``D`` model dim, ``K`` experts per token, ``E`` experts, ``N`` routed (token, expert)
pairs kept (``T * K`` when dropless).

Parallelism is applied to the parts, from outside, with the same styles on every framework::

    ExpertParallel().apply(moe.experts, mesh["ep"])              # or TensorParallel / ExpertTensorParallel
    ReordererSequenceParallel().apply(moe.reorderer, mesh["tp"])  # split the routed tokens over tp ranks

When the experts carry an expert-parallel style and the layer has shared experts, the layer drives the style's
dispatch itself so the shared experts run while the token all-to-all is in flight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.dtensor import DTensor
from hyper_parallel.dtensor.placement import Partial, Replicate, chunk_sizes
from hyper_parallel.expert_parallel.styles import dispatched_rows, expert_style_of
from hyper_parallel.functional import zeros_connected
from hyper_parallel.moe.losses import update_expert_bias

__all__ = ["MoEMixin", "RoutingStats", "sequence_parallel_mesh_of"]

_SP_ATTR = "_hyper_parallel_sequence_parallel"


def sequence_parallel_mesh_of(reorderer):
    """The mesh a ReordererSequenceParallel style split ``reorderer``'s tokens over, or ``None``."""
    return getattr(reorderer, _SP_ATTR, None)


def _partial_grad(x, mesh):
    return DTensor.from_local(x, mesh, [Replicate()]).to_local(grad_placements=[Partial()])


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingStats:
    """What one forward of a MoE layer routed, for THIS rank's tokens (sum over the data-parallel ranks for the
    global picture). The counts stay tensors on the device: reading them is the caller's host sync, not the layer's.
    """

    num_tokens_per_expert: Any
    """int64 ``[E]``: (token, expert) pairs each expert was chosen for, before any capacity limit."""
    num_kept_per_expert: Any
    """int64 ``[E]``: pairs each expert computed (equal to the above when dropless). Under
    :class:`~hyper_parallel.expert_parallel.ReordererSequenceParallel`, those of this rank's slice of the tokens."""
    num_dropped: int
    """Pairs dropped by the capacity limit (0 when dropless); of this rank's slice under sequence parallelism."""


class MoEMixin:
    """A token-choice top-k Mixture-of-Experts layer with SwiGLU experts, written once for every framework.

    ``hyper_parallel.moe.MoE`` is this mixin plus ``torch.nn.Module`` (torch) or ``mindspore.nn.Cell`` (MindSpore).
    The parts are built from the class attributes :attr:`router_class`, :attr:`reorderer_class` and
    :attr:`experts_class` (the same framework's classes); a subclass may swap any of them.

    After every forward, :attr:`routing_stats` holds the step's per-expert loads and dropped pairs.

    Args:
        dim: model dimension D.
        hidden_dim: each routed expert's hidden dimension.
        num_experts: routed experts E.
        top_k: experts per token K.
        num_shared_experts: shared experts run on every token (merged into one SwiGLU of
            ``num_shared_experts * hidden_dim``); 0 for none.
        score_func: router option (see :class:`~hyper_parallel.moe.router.TokenChoiceTopKRouterMixin`).
        route_norm: router option.
        route_scale: router option.
        num_expert_groups: router option (group-limited routing).
        num_limited_groups: router option (group-limited routing).
        capacity_factor: 0 = dropless; otherwise overflow pairs are dropped (see the reorderer).
        use_expert_bias: keep the DeepSeek-V3 aux-loss-free bias (selection only); update it with
            :meth:`update_expert_bias`.
        aux_loss_tracker: a :class:`~hyper_parallel.moe.losses.LoadBalancingLossTracker` that receives every
            forward's router scores and loads, for a load-balancing loss batched across layers.
        init_std: standard deviation of the normal initialisation of every weight.
        seed: initial weights are identical across ranks and frameworks for one seed.
    """

    #: The router's class (``TokenChoiceTopKRouter`` of the same framework).
    router_class: type
    #: The reorderer's class (``TokenReorderer`` of the same framework).
    reorderer_class: type
    #: The routed and shared experts' class (``GroupedExperts`` of the same framework).
    experts_class: type
    #: Module state each rank holds for itself rather than a replica of a shared value: the loads this rank counted
    #: since the last :meth:`update_expert_bias`. :mod:`hyper_parallel.checkpoint` keeps one value per rank.
    rank_local_state: tuple[str, ...] = ("tokens_per_expert",)

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int, top_k: int, num_shared_experts: int = 0,
                 score_func: str = "softmax", route_norm: bool = False, route_scale: float = 1.0,
                 num_expert_groups: int | None = None, num_limited_groups: int | None = None,
                 capacity_factor: float = 0.0, use_expert_bias: bool = False, aux_loss_tracker=None,
                 init_std: float = 0.02, seed: int = 0):
        super().__init__()
        p = get_platform()
        self.dim, self.top_k, self.num_experts = dim, top_k, num_experts
        self.router = self.router_class(
            dim=dim, num_experts=num_experts, top_k=top_k, score_func=score_func, route_norm=route_norm,
            route_scale=route_scale, num_expert_groups=num_expert_groups, num_limited_groups=num_limited_groups,
            init_std=init_std, seed=seed, loss_tracker=aux_loss_tracker)
        self.reorderer = self.reorderer_class(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)
        self.experts = self.experts_class(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts,
                                          init_std=init_std, seed=seed + 1)
        self.shared_experts = None
        if num_shared_experts:
            self.shared_experts = self.experts_class(dim=dim, hidden_dim=hidden_dim * num_shared_experts,
                                                     num_experts=1, init_std=init_std, seed=seed + 2)
        self.routing_stats: RoutingStats | None = None
        self.expert_bias = None
        if use_expert_bias:
            # module state, in state_dict() on both frameworks: non-trainable parameters (no optimizer steps them)
            self.expert_bias = p.Parameter(p.zeros((num_experts,)), requires_grad=False)
            self.tokens_per_expert = p.Parameter(p.zeros((num_experts,)), requires_grad=False)

    def forward(self, x):
        """``x [..., D]`` -> the same shape."""
        p = get_platform()
        shape = tuple(x.shape)
        if not shape or shape[-1] != self.dim:  # before the reshape, which would regroup the values silently
            raise ValueError(f"MoE: the input's last dimension must be the model dimension dim={self.dim}; got an "
                             f"input of shape {list(shape)}")
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        with p.profile_range("hyper_parallel.moe.router"):
            top_scores_TK, selected_TK, num_tokens_per_expert_E = self.router(x_TD, self.expert_bias)
        # side effects once per real step: not again when activation checkpointing re-runs this forward in backward
        recomputing = p.recompute_phase() == "again"
        if self.expert_bias is not None and not recomputing:
            p.assign(self.tokens_per_expert,
                     self.tokens_per_expert + p.kernels.convert(num_tokens_per_expert_E, "float32"))
        sp_mesh = sequence_parallel_mesh_of(self.reorderer)
        x_routed_TD = x_TD
        if sp_mesh is not None:
            # Each tp rank routes only its slice of the tokens, so the gradients reaching the (replicated)
            # scores and the tokens it gathers are partial: declare them so, and backward sums them over tp.
            top_scores_TK = _partial_grad(top_scores_TK, sp_mesh)
            x_routed_TD = _partial_grad(x_TD, sp_mesh)
        with p.profile_range("hyper_parallel.moe.reorder"):
            scores_N, pairs_N, counts_E = self.reorderer(top_scores_TK, selected_TK)
        N = pairs_N.shape[0]
        # under sequence parallelism the reorderer saw only this rank's slice of the tokens
        routed_T = T if sp_mesh is None else chunk_sizes(T, sp_mesh.size())[sp_mesh.get_local_rank()]
        if not recomputing:
            self.routing_stats = RoutingStats(num_tokens_per_expert=num_tokens_per_expert_E,
                                              num_kept_per_expert=counts_E, num_dropped=routed_T * self.top_k - N)
        routed_ND = p.kernels.gather_pairs(x_routed_TD, pairs_N, self.top_k) if N \
            else zeros_connected(x_routed_TD, (0, self.dim))
        routed_ND, shared_TD = self._experts(routed_ND, counts_E, x_TD)
        with p.profile_range("hyper_parallel.moe.combine_weighted"):
            out_TD = p.kernels.combine_pairs(routed_ND, scores_N, pairs_N, T, self.top_k)
        if sp_mesh is not None:
            out_TD = DTensor.from_local(out_TD, sp_mesh, [Partial()]).redistribute(sp_mesh, [Replicate()]) \
                .to_local()
        if shared_TD is not None:
            out_TD = out_TD + shared_TD
        return out_TD.reshape(shape)

    def _experts(self, routed_ND, counts_E, x_TD):
        """Routed experts (through their style's hooks, or with the shared experts overlapped) and shared."""
        p = get_platform()
        applied = expert_style_of(self.experts)
        if self.shared_experts is None or applied is None:
            with p.profile_range("hyper_parallel.moe.experts"):
                routed = self.experts(routed_ND, counts_E)
            return routed, None if self.shared_experts is None else self._shared(x_TD)
        style, mesh = applied
        pending = style.dispatch(routed_ND, counts_E, mesh, async_op=True, num_experts=self.num_experts)
        shared_TD = self._shared(x_TD)  # runs while the token all-to-all is in flight
        d = pending.wait()
        # a module call, so every hook of the experts runs (FSDP's, a profiler's); the style's own hooks see rows
        # already dispatched, skip the dispatch and combine
        with p.profile_range("hyper_parallel.moe.experts"):
            return self.experts(dispatched_rows(d), d.num_tokens_per_expert), shared_TD

    def _shared(self, x_TD):
        with get_platform().profile_range("hyper_parallel.moe.shared_experts"):
            return self.shared_experts(x_TD, (x_TD.shape[0],))

    def update_expert_bias(self, update_rate: float = 1e-3, group=None):
        """DeepSeek-V3 aux-loss-free balancing: nudge the selection bias towards the mean load, from the loads
        counted since the last update (summed over ``group``, e.g. the data-parallel ranks), then reset them."""
        if self.expert_bias is None:
            raise ValueError("update_expert_bias needs MoE(use_expert_bias=True)")
        p = get_platform()
        load = self.tokens_per_expert if group is None else p.all_reduce(self.tokens_per_expert, group=group)
        new_bias = update_expert_bias(self.expert_bias, load, update_rate)
        self.expert_bias = p.replace_parameter(self, "expert_bias", new_bias)
        p.assign(self.tokens_per_expert,
                 p.zeros((self.num_experts,), device=getattr(self.tokens_per_expert, "device", None)))
