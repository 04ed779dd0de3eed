"""GroupedExperts: E SwiGLU experts applied to rows already grouped by expert.

``out_e = w2_e(silu(w1_e x) * w3_e x)`` for the rows of each expert, with parameters ``w1 [E, hidden, dim]``,
``w2 [E, dim, hidden]``, ``w3 [E, hidden, dim]``. Called as ``experts(routed_input [N, dim], num_tokens_per_expert
[E]) -> [N, dim]``, rows in the same order. The per-expert products go through ``platform.kernels.grouped_mm``: a loop
over experts on every backend (the reference), replaced by a batched kernel where the adapter has one.

An expert-parallel style may shard the parameters (see ``hyper_parallel.expert_parallel``); the computation is the
same on the local shards.
"""

from __future__ import annotations

from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.expert_parallel.styles import host_counts
from hyper_parallel.moe._layers import init_normal

__all__ = ["GroupedExpertsMixin", "swiglu_experts"]


def swiglu_experts(x_ND, num_tokens_per_expert: Sequence[int], w1_EHD, w2_EDH, w3_EHD):
    """The experts' computation on local parameters; ``num_tokens_per_expert`` are host ints summing to N."""
    p = get_platform()
    h_NH, g_NH = p.kernels.gate_up(x_ND, w1_EHD, w3_EHD, num_tokens_per_expert)
    return p.kernels.grouped_mm(p.kernels.swiglu(h_NH, g_NH), w2_EDH.mT, num_tokens_per_expert)


class GroupedExpertsMixin:
    """``num_experts`` SwiGLU experts (see the module docstring), written once for every framework.

    The classes users instantiate are ``hyper_parallel.moe.GroupedExperts`` (``torch.nn.Module`` on torch,
    ``mindspore.nn.Cell`` on MindSpore), each this mixin plus the framework's module base.

    Args:
        dim: model dimension.
        hidden_dim: each expert's hidden dimension.
        num_experts: number of experts.
        init_std: standard deviation of the normal initialisation.
        seed: makes the initial weights identical across ranks and frameworks.

    Raises:
        ValueError: a size is not a positive int.
    """

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int, init_std: float = 0.02,
                 seed: int | None = 0):
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupedExperts: {name} must be a positive int, got {value!r}")
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        p = get_platform()
        self.w1 = p.Parameter(init_normal((num_experts, hidden_dim, dim), init_std, seed, 1))
        self.w2 = p.Parameter(init_normal((num_experts, dim, hidden_dim), init_std, seed, 2))
        self.w3 = p.Parameter(init_normal((num_experts, hidden_dim, dim), init_std, seed, 3))

    def forward(self, routed_input, num_tokens_per_expert):
        """``routed_input [N, dim]`` grouped by expert, ``num_tokens_per_expert`` (a tensor or host ints)."""
        p = get_platform()
        if routed_input.dtype != self.w1.dtype:
            # checked on every rank, rows or not: a rank that received no rows would otherwise skip the failing
            # matmul and wait in the combine for peers that raised
            raise TypeError(f"GroupedExperts: the routed tokens are {p.dtype_name(routed_input.dtype)} but the "
                            f"experts' weights are {p.dtype_name(self.w1.dtype)}; cast the tokens or the layer so "
                            "they match")
        return swiglu_experts(routed_input, host_counts(num_tokens_per_expert), self.w1, self.w2, self.w3)
