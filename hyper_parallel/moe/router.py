"""Token-choice top-k routing and the expert-major reordering of the routed (token, expert) pairs.

Shape suffixes: ``T`` tokens, ``D`` model dim, ``E`` experts, ``K`` experts chosen per token (``top_k``), ``G``
expert groups, ``N`` routed (token, expert) pairs (``T * K``, fewer when a capacity drops some).

* ``TokenChoiceTopKRouter`` scores every expert for every token (softmax or sigmoid of ``x @ gate.T``, in
  float32), optionally restricted to the best expert groups (DeepSeek-V3 group-limited routing) and steered by an
  expert bias (DeepSeek-V3 aux-loss-free balancing), and keeps the ``top_k`` best experts per token.
* ``TokenReorderer`` stably sorts the ``T * K`` pairs by expert so each expert's rows are contiguous, and can
  cap every expert at a capacity (Switch / MegaBlocks capacity factor), dropping the overflow pairs.

Both are written once here as mixins; ``hyper_parallel.moe.TokenChoiceTopKRouter`` / ``TokenReorderer`` are the
framework classes (the mixin plus ``torch.nn.Module`` or ``mindspore.nn.Cell``).
"""

from __future__ import annotations

import math

from hyper_parallel._select import get_platform
from hyper_parallel.functional import zeros_connected
from hyper_parallel.moe._layers import init_normal

__all__ = ["TokenChoiceTopKRouterMixin", "TokenReordererMixin", "SCORE_FUNCS", "expert_capacity"]

#: Valid ``score_func`` values.
SCORE_FUNCS = ("softmax", "sigmoid")


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _check_top_k(owner: str, num_experts, top_k) -> None:
    _positive_int(owner, "num_experts", num_experts)
    _positive_int(owner, "top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"{owner}: top_k must be <= num_experts ({num_experts}), got top_k={top_k}")


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """``ceil(capacity_factor * num_tokens * top_k / num_experts)`` (at least 1): the most pairs one expert keeps.

    The quotient is nudged down by 1e-9 before the ceiling: ``1.1 * 25 * 2 / 5`` is ``11.000000000000002`` in
    floats, and the capacity the decimal inputs mean is 11, not 12.
    """
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9))


class TokenChoiceTopKRouterMixin:
    """Each token picks its ``top_k`` best-scoring experts.

    Args:
        dim: model dimension D.
        num_experts: number of experts E.
        top_k: experts chosen per token K (``1 <= K <= E``).
        score_func: ``"softmax"`` (over the E experts) or ``"sigmoid"`` (each expert on its own).
        route_norm: renormalise each token's K scores to sum to 1 (useful with sigmoid).
        route_scale: factor applied to the returned scores (after ``route_norm``).
        num_expert_groups: split the experts into this many equal groups for group-limited routing.
        num_limited_groups: each token may only choose experts from its best this-many groups.
        init_std: standard deviation of the gate's normal initialisation.
        seed: makes the gate identical across ranks and frameworks.
        loss_tracker: optional :class:`~hyper_parallel.moe.losses.LoadBalancingLossTracker`; when given, every
            forward saves ``(scores_TE, num_tokens_per_expert_E)`` into it for the load-balancing loss
            (which needs at least one token).

    Raises:
        ValueError: a size is not a positive int, ``top_k > num_experts``, ``score_func`` is unknown, only
            one of the two group arguments is given, ``num_experts`` is not divisible by
            ``num_expert_groups``, ``num_limited_groups > num_expert_groups``, the kept groups hold fewer
            than ``top_k`` experts, or sigmoid group scoring meets groups of one expert.
    """

    def __init__(self, *, dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 route_norm: bool = False, route_scale: float = 1.0, num_expert_groups: int | None = None,
                 num_limited_groups: int | None = None, init_std: float = 0.02, seed: int | None = 0,
                 loss_tracker=None):
        super().__init__()
        owner = "TokenChoiceTopKRouter"
        _positive_int(owner, "dim", dim)
        _check_top_k(owner, num_experts, top_k)
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"{owner}: score_func must be one of {list(SCORE_FUNCS)}, got {score_func!r}")
        if (num_expert_groups is None) != (num_limited_groups is None):
            raise ValueError(f"{owner}: num_expert_groups and num_limited_groups must be given together, got "
                             f"num_expert_groups={num_expert_groups!r}, num_limited_groups={num_limited_groups!r}")
        if num_expert_groups is not None:
            _positive_int(owner, "num_expert_groups", num_expert_groups)
            _positive_int(owner, "num_limited_groups", num_limited_groups)
            if num_experts % num_expert_groups:
                raise ValueError(f"{owner}: num_experts ({num_experts}) must be divisible by num_expert_groups, "
                                 f"got num_expert_groups={num_expert_groups}")
            if num_limited_groups > num_expert_groups:
                raise ValueError(f"{owner}: num_limited_groups must be <= num_expert_groups "
                                 f"({num_expert_groups}), got num_limited_groups={num_limited_groups}")
            per_group = num_experts // num_expert_groups
            if top_k > num_limited_groups * per_group:
                raise ValueError(f"{owner}: top_k must be <= num_limited_groups * experts per group "
                                 f"({num_limited_groups} * {per_group}), got top_k={top_k}")
            if score_func == "sigmoid" and per_group < 2:
                raise ValueError(f"{owner}: sigmoid group scoring sums each group's top-2 scores, so groups "
                                 f"need >= 2 experts, got {per_group} (num_experts={num_experts}, "
                                 f"num_expert_groups={num_expert_groups})")
        self.dim, self.num_experts, self.top_k, self.score_func = dim, num_experts, top_k, score_func
        self.route_norm, self.route_scale = bool(route_norm), float(route_scale)
        self.num_expert_groups, self.num_limited_groups = num_expert_groups, num_limited_groups
        self.loss_tracker = loss_tracker
        self.gate = get_platform().Parameter(init_normal((num_experts, dim), init_std, seed, 0))

    def scores(self, x_TD):
        """Router probabilities ``[T, E]`` in float32 (the input of the load-balancing loss)."""
        if len(x_TD.shape) != 2 or x_TD.shape[1] != self.dim:
            raise ValueError(f"TokenChoiceTopKRouter: x must have shape [tokens, {self.dim}], got "
                             f"{list(x_TD.shape)}")
        # float32 for the scores: a bf16 softmax over many experts loses the small differences top-k decides on
        logits_TE = get_platform().kernels.matmul(x_TD.float(), self.gate.float().mT)
        return logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()

    def choices(self, x_TD, expert_bias=None):
        """``(scores_TE, choice_TE)``: the router's scores (:meth:`scores`) and what top-k picks the experts by (the
        scores plus ``expert_bias``, limited to each token's best expert groups when groups are set).

        Raises:
            ValueError: ``x_TD`` is not ``[T, dim]`` or ``expert_bias`` is not ``[E]``.
        """
        scores_TE = self.scores(x_TD)
        choice_TE = scores_TE
        if expert_bias is not None:
            if tuple(expert_bias.shape) != (self.num_experts,):
                raise ValueError(f"TokenChoiceTopKRouter: expert_bias must have shape [{self.num_experts}], "
                                 f"got {list(expert_bias.shape)}")
            # aux-loss-free balancing: the bias moves WHICH experts win, never the weights they get
            choice_TE = scores_TE + expert_bias.float()
        if self.num_expert_groups is not None:
            choice_TE = self._limit_to_groups(choice_TE)
        return scores_TE, choice_TE

    def _limit_to_groups(self, choice_TE):
        """Mask (to -inf) the experts outside each token's best ``num_limited_groups`` groups."""
        p = get_platform()
        T, G = choice_TE.shape[0], self.num_expert_groups
        grouped_TGX = choice_TE.reshape(T, G, self.num_experts // G)
        if self.score_func == "sigmoid":  # DeepSeek-V3: a group is as good as its two best experts
            group_score_TG = grouped_TGX.topk(2)[0].sum(-1)
        else:  # DeepSeek-V2 group-limited greedy: a group is as good as its best expert
            group_score_TG = grouped_TGX.amax(-1)
        kept_TL = p.kernels.convert(group_score_TG.topk(self.num_limited_groups)[1], "int64")
        # one-hot by comparison (no scatter: its in-place forms differ across frameworks)
        dropped_TG = (kept_TL.unsqueeze(-1) == p.arange(G, device=getattr(kept_TL, "device", None))).sum(1) == 0
        masked_TGX = grouped_TGX.masked_fill(dropped_TG.unsqueeze(-1), float("-inf"))
        return masked_TGX.reshape(T, self.num_experts)

    def forward(self, x_TD, expert_bias=None):
        """Route ``x_TD``.

        Args:
            x_TD: tokens ``[T, dim]``.
            expert_bias: optional ``[E]`` bias added to the scores for CHOOSING experts only.

        Returns:
            ``(top_scores_TK, selected_experts_TK, num_tokens_per_expert_E)``: the unbiased (normalised,
            scaled) scores of the chosen experts in descending order of choice, their ids (int64), and how
            many pairs each expert received (int64).

        Raises:
            ValueError: ``x_TD`` is not ``[T, dim]`` or ``expert_bias`` is not ``[E]``.
        """
        p = get_platform()
        scores_TE, choice_TE = self.choices(x_TD, expert_bias)
        selected_TK = p.kernels.convert(choice_TE.topk(self.top_k)[1], "int64")
        top_scores_TK = scores_TE.gather(1, selected_TK)
        if self.route_norm:
            # the epsilon keeps an all-zero row (sigmoid underflow) finite
            top_scores_TK = top_scores_TK / (top_scores_TK.sum(-1, keepdim=True) + 1e-20)
        top_scores_TK = top_scores_TK * self.route_scale
        counts_E = p.kernels.expert_counts(selected_TK, self.num_experts)  # zeros for zero tokens
        if self.loss_tracker is not None:
            phase = p.recompute_phase()
            if phase == "first":
                raise ValueError(
                    "TokenChoiceTopKRouter: a load-balancing loss tracker inside a recomputed Cell gets no gradient "
                    "(MindSpore runs the recomputed Cell's first forward without autograd); recompute the experts "
                    "only (moe.experts.recompute()), or balance with the expert bias (use_expert_bias=True)")
            if phase is None:  # once per real step: not again when backward re-runs this forward
                self.loss_tracker.save(scores_TE, counts_E)
        return top_scores_TK, selected_TK, counts_E


class TokenReordererMixin:
    """Sort the routed (token, expert) pairs by expert, stably (ties keep token order).

    Args:
        num_experts: number of experts E.
        top_k: experts per token K.
        capacity_factor: 0 = dropless; ``> 0``: each expert keeps at most :func:`expert_capacity` pairs, its
            earliest tokens first, and the overflow pairs are dropped (absent from the output).

    Raises:
        ValueError: a size is not a positive int, ``top_k > num_experts``, or ``capacity_factor`` is negative
            or not finite.
    """

    def __init__(self, *, num_experts: int, top_k: int, capacity_factor: float = 0.0):
        super().__init__()
        _check_top_k("TokenReorderer", num_experts, top_k)
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) \
                or not math.isfinite(capacity_factor) or capacity_factor < 0:
            raise ValueError(f"TokenReorderer: capacity_factor must be a finite number >= 0 (0 = dropless), "
                             f"got {capacity_factor!r}")
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, float(capacity_factor)

    def capacity(self, num_tokens: int) -> int | None:
        """Pairs each expert keeps for ``num_tokens`` tokens, or None when dropless."""
        if self.capacity_factor == 0:
            return None
        return expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts)

    def forward(self, top_scores_TK, selected_experts_TK, token_offset: int = 0):
        """Reorder the pairs expert-major.

        Args:
            top_scores_TK: ``[T, K]`` routing weights.
            selected_experts_TK: ``[T, K]`` expert ids in ``[0, E)`` (not checked: that needs a host sync).
            token_offset: position of these T tokens in a longer sequence (set by
                ReordererSequenceParallel, which hands each rank a slice); added to the returned indices.

        Returns:
            ``(top_scores_N, pair_indices_N, num_tokens_per_expert_E)``: the kept pairs' weights and flat pair
            indices (int64, ``(token_offset + token) * top_k + k``; the token is ``pair // top_k``) grouped by
            expert, and the kept pairs per expert (int64). Pair indices, unlike token indices, are unique, so
            the outputs can be put back with a plain indexed assignment (no scatter-add).

        Raises:
            ValueError: the two inputs are not both ``[T, top_k]``.
        """
        p = get_platform()
        E = self.num_experts
        shape = tuple(selected_experts_TK.shape)
        if len(shape) != 2 or shape[1] != self.top_k or tuple(top_scores_TK.shape) != shape:
            raise ValueError(f"TokenReorderer: top_scores and selected_experts must both have shape [tokens, "
                             f"{self.top_k}], got {list(top_scores_TK.shape)} and {list(shape)}")
        n = shape[0] * shape[1]
        device = getattr(selected_experts_TK, "device", None)  # the input's, not the platform's default
        if n == 0:  # zero-size sorts, sums and indexing are traps on some backends
            return (zeros_connected(top_scores_TK, (0,)), p.zeros((0,), dtype="int64", device=device),
                    p.zeros((E,), dtype="int64", device=device))
        experts_N = p.kernels.convert(selected_experts_TK.reshape(-1), "int64")
        counts_E = p.kernels.expert_counts(experts_N, E)
        order_N = p.kernels.stable_order(experts_N)
        capacity = self.capacity(shape[0])
        if capacity is not None and capacity < n:
            # A pair's rank inside its expert's (token-ordered) run decides: the first `capacity` stay. Only
            # tensor ops, so no host sync is needed to find the overflow.
            start_E = counts_E.cumsum(0) - counts_E
            rank_N = p.arange(n, device=device) - start_E[experts_N[order_N]]
            order_N = order_N[rank_N < capacity]
            counts_E = counts_E.clamp(max=capacity)
        return top_scores_TK.reshape(-1)[order_N], order_N + token_offset * self.top_k, counts_E
