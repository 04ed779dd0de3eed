"""Expert load balancing: the Switch-style auxiliary loss (per layer and batched over layers, as in MegaBlocks) and
DeepSeek-V3's auxiliary-loss-free expert-bias update.

Shape suffixes: ``T`` tokens, ``E`` experts, ``K`` experts chosen per token (``top_k``), ``L`` layers.

The loss of one layer is

    loss = E * sum_e f_e * P_e,   f_e = n_e / (T * K),   P_e = (1 / T) * sum_t scores[t, e]

where ``n_e`` counts the (token, expert) pairs routed to expert ``e`` (so ``sum_e f_e = 1`` when nothing is
dropped) and ``scores`` are the router probabilities of all E experts. A perfectly uniform router scores 1 (softmax
scores). Only ``P`` carries a gradient: ``d loss / d scores[t, e] = E * n_e / (T * K * T)``; the counts come
from a top-k and are constants.
"""

from __future__ import annotations

import math

from hyper_parallel._select import get_platform

__all__ = ["load_balancing_loss", "LoadBalancingLossTracker", "update_expert_bias"]


def _check_pair(what: str, scores_TE, num_tokens_per_expert_E) -> None:
    if len(scores_TE.shape) != 2 or scores_TE.shape[0] < 1:
        raise ValueError(f"{what}: scores must have shape [tokens >= 1, experts], got {list(scores_TE.shape)}")
    if tuple(num_tokens_per_expert_E.shape) != (scores_TE.shape[1],):
        raise ValueError(f"{what}: num_tokens_per_expert must have shape [{scores_TE.shape[1]}] (the experts of "
                         f"scores), got {list(num_tokens_per_expert_E.shape)}")


def _check_top_k(what: str, top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{what}: top_k must be a positive int, got {top_k!r}")


def load_balancing_loss(scores_TE, num_tokens_per_expert_E, top_k: int):
    """The Switch-style load-balancing loss of one layer (formula in the module docstring).

    Args:
        scores_TE: router probabilities ``[T, E]`` (differentiable), T >= 1.
        num_tokens_per_expert_E: pairs routed to each expert ``[E]`` (any numeric dtype).
        top_k: experts chosen per token.

    Returns:
        A float32 scalar tensor.

    Raises:
        ValueError: the shapes do not match, there are no tokens, or ``top_k`` is not a positive int.
    """
    _check_pair("load_balancing_loss", scores_TE, num_tokens_per_expert_E)
    _check_top_k("load_balancing_loss", top_k)
    T, E = scores_TE.shape
    f32 = get_platform().dtype("float32")
    mean_E = scores_TE.float().mean(0)
    return (num_tokens_per_expert_E.to(f32) * mean_E).sum(0) * (E / (T * top_k))


class LoadBalancingLossTracker:
    """Collects every MoE layer's ``(scores, counts)`` during forward; one batched loss for all of them.

    MegaBlocks' ``batched_load_balancing_loss``: one concatenation and one dot product instead of a loss per
    layer. The result is the MEAN over the saved layers of :func:`load_balancing_loss`, times ``coeff``:

        loss = coeff * E / (L * T * K) * sum over layers l and experts e of n_le * P_le

    (the mean keeps ``coeff`` independent of the depth). Every saved layer must have the same T and E.

    >>> tracker = LoadBalancingLossTracker()                               # doctest: +SKIP
    >>> router = TokenChoiceTopKRouter(..., loss_tracker=tracker)          # doctest: +SKIP
    >>> total = task_loss + tracker.loss(top_k=2, coeff=0.01); tracker.clear()   # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._saved: list[tuple] = []

    def __len__(self) -> int:
        return len(self._saved)

    def save(self, scores_TE, num_tokens_per_expert_E) -> None:
        """Record one layer's router probabilities ``[T, E]`` and its pairs per expert ``[E]``.

        Raises:
            ValueError: bad shapes, or T or E differ from the layers already saved.
        """
        _check_pair("LoadBalancingLossTracker.save", scores_TE, num_tokens_per_expert_E)
        if self._saved and tuple(self._saved[0][0].shape) != tuple(scores_TE.shape):
            raise ValueError(f"LoadBalancingLossTracker.save: every layer must have the scores shape of the first "
                             f"([tokens, experts] = {list(self._saved[0][0].shape)}), got {list(scores_TE.shape)}")
        self._saved.append((scores_TE, num_tokens_per_expert_E))

    def loss(self, top_k: int, coeff: float = 1.0, group=None):
        """``coeff`` times the mean per-layer loss over the saved layers (a float32 scalar); does not clear.

        Args:
            top_k: experts chosen per token.
            coeff: the loss weight.
            group: a process group (e.g. the data-parallel ranks, ``mesh.get_group("dp")``) over which the loads are
                summed first, as Megatron-Core's global auxiliary loss does: ``f_e`` becomes the fraction of the
                group's (token, expert) pairs routed to ``e``, while ``P_e`` stays this rank's mean score (its
                gradient is this rank's). ``None``: this rank's loads (one all-reduce of ``[L, E]`` counts
                otherwise).

        Raises:
            ValueError: nothing was saved, or ``top_k`` is not a positive int.
        """
        _check_top_k("LoadBalancingLossTracker.loss", top_k)
        if not self._saved:
            raise ValueError("LoadBalancingLossTracker.loss: no layer has saved scores since the last clear(); "
                             "got 0 layers")
        p = get_platform()
        f32 = p.dtype("float32")
        L = len(self._saved)
        T, E = self._saved[0][0].shape
        mean_LE = p.cat([s.float() for s, _ in self._saved], dim=1).mean(0)
        counts_LE = p.cat([c.to(f32) for _, c in self._saved])
        if group is not None:  # the group's loads, over the group's tokens (T per rank)
            counts_LE = p.all_reduce(counts_LE, group=group) / group.size
        return (counts_LE * mean_LE).sum(0) * (coeff * E / (L * T * top_k))

    def clear(self) -> None:
        """Forget the saved layers (call once per training step, after the loss)."""
        self._saved.clear()


def update_expert_bias(expert_bias_E, num_tokens_per_expert_E, update_rate: float, *, center: bool = False):
    """DeepSeek-V3's auxiliary-loss-free balancing step: ``bias_e + rate * sign(mean_load - load_e)``.

    An overloaded expert's bias drops by ``rate`` and an underloaded one's rises, so the next steps route fewer or
    more tokens to it; an expert exactly at the mean load is left alone. The bias only affects selection (see
    ``TokenChoiceTopKRouter``), so it is a buffer updated outside autograd, once per step, from the counts summed
    over the step (and over data-parallel ranks, which the caller all-reduces). The update term is built from
    comparisons, so it carries no gradient; the returned tensor is new and the input is unchanged.

    Args:
        expert_bias_E: current bias ``[E]``.
        num_tokens_per_expert_E: load of each expert ``[E]`` (any numeric dtype).
        update_rate: step size (DeepSeek-V3 uses 1e-3).
        center: subtract the mean of the update so the biases keep summing to the same value (torchtitan does).

    Returns:
        The new bias ``[E]``, in ``expert_bias_E``'s dtype.

    Raises:
        ValueError: shapes differ, or ``update_rate`` is negative or not finite.
    """
    if tuple(num_tokens_per_expert_E.shape) != tuple(expert_bias_E.shape) or len(expert_bias_E.shape) != 1:
        raise ValueError(f"update_expert_bias: expert_bias and num_tokens_per_expert must both have shape "
                         f"[experts], got {list(expert_bias_E.shape)} and {list(num_tokens_per_expert_E.shape)}")
    if isinstance(update_rate, bool) or not isinstance(update_rate, (int, float)) or not math.isfinite(update_rate) \
            or update_rate < 0:
        raise ValueError(f"update_expert_bias: update_rate must be a finite number >= 0, got {update_rate!r}")
    k = get_platform().kernels
    load_E = k.convert(num_tokens_per_expert_E, "float32")
    gap_E = load_E.mean(0) - load_E
    # sign() spelled with comparisons: shared by every backend, and exactly 0 at the mean
    delta_E = (k.convert(gap_E > 0, "float32") - k.convert(gap_E < 0, "float32")) * update_rate
    if center:
        delta_E = delta_E - delta_E.mean(0)
    return expert_bias_E + delta_E.to(expert_bias_E.dtype)
