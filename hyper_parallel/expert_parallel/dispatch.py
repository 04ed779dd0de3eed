"""Token dispatch and combine for expert parallelism, with their metadata as a frozen value.

Shape legend: ``N`` rows this rank routes (grouped by global expert), ``D`` hidden size, ``G`` global experts,
``R`` ranks of the EP group, ``E`` local experts (``G / R``), ``T`` rows received, ``P`` rows after alignment
padding.

Dispatch::

    counts all_gather   every rank's num_tokens_per_expert_G + a header -> [R, G + H] (see counts_exchange)
    ONE host sync       the gathered counts -> Python ints: split sizes, totals, and checks run on every rank
    token all_to_all    routed_input_ND  ->  received_TD                           (rank-major)
    permute             received_TD  ->  permuted_PD                               (expert-major, padded)

Combine is the reverse: unpermute ``[P, D] -> [T, D]``, then the token all_to_all back ``[T, D] -> [N, D]``.

Dispatch returns :class:`DispatchMeta`, a frozen value that combine consumes: nothing is stored on a style or a
module between the two, so one style object can serve many layers and an activation-checkpoint re-run is safe.
"""

from __future__ import annotations

import dataclasses
import logging

from hyper_parallel._select import get_platform
from hyper_parallel.expert_parallel.counts_exchange import exchange_counts
from hyper_parallel.expert_parallel.permute import PermuteIndices, build_permute_indices, permute, unpermute
from hyper_parallel.functional import all_to_all_single_autograd
from hyper_parallel.platform import Group

_log = logging.getLogger(__name__)

__all__ = ["DispatchMeta", "Dispatched", "PendingDispatch", "token_dispatch", "token_combine"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DispatchMeta:
    """What combine needs to undo a dispatch."""

    group: Group
    """The EP group the tokens were exchanged in."""
    input_splits: tuple[int, ...]
    """Rows this rank sent to each EP rank."""
    output_splits: tuple[int, ...]
    """Rows this rank received from each EP rank."""
    indices: PermuteIndices
    """The rank-major -> expert-major permutation of the received rows."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dispatched:
    """The experts' input after dispatch."""

    routed_input: object
    """``[P, D]`` rows grouped by local expert (padded per expert when aligned)."""
    num_tokens_per_expert: tuple[int, ...]
    """Rows per local expert (host ints, padding included)."""
    meta: DispatchMeta
    """Consumed by :func:`token_combine`."""
    counts_RE: object = None
    """int64 ``[R*E]`` on the device: rows received per (source rank, local expert), before padding."""
    align: int = 1
    """The padding multiple of each local expert's rows."""

    def counts_tensor(self):
        """:attr:`num_tokens_per_expert` as an int64 tensor on the rows' device, with no host-to-device copy when
        there is no padding (the received counts summed over ranks)."""
        p = get_platform()
        E = len(self.num_tokens_per_expert)
        if self.counts_RE is None or self.align != 1:
            return p.tensor(list(self.num_tokens_per_expert), dtype="int64",
                            device=getattr(self.routed_input, "device", None))
        return self.counts_RE.reshape(-1, E).sum(0)


class PendingDispatch:
    """A dispatch whose token all-to-all is in flight; :meth:`wait` finishes it (permute included)."""

    def __init__(self, received_TD, handle, counts_RE, host_counts_RE: list[int], meta_args: dict, align: int):
        self._received, self._handle = received_TD, handle
        self._counts, self._host_counts, self._meta_args, self._align = counts_RE, host_counts_RE, meta_args, align

    def wait(self) -> Dispatched:
        p = get_platform()
        with p.profile_range("hyper_parallel.dispatch.wait"):
            self._handle.wait()
        group = self._meta_args["group"]
        with p.profile_range("hyper_parallel.permute"):
            indices = build_permute_indices(self._counts, self._host_counts, group.size,
                                            len(self._host_counts) // group.size, align=self._align)
            routed = permute(self._received, indices)
        return Dispatched(routed_input=routed, num_tokens_per_expert=indices.num_tokens_per_expert,
                          meta=DispatchMeta(indices=indices, **self._meta_args), counts_RE=self._counts,
                          align=self._align)


def token_dispatch(routed_input_ND, num_tokens_per_expert_G, group: Group, *, num_experts: int | None = None,
                   align: int = 1, async_op: bool = False):
    """Send each row to the rank owning its expert and group the received rows by local expert.

    Args:
        routed_input_ND: rows grouped by global expert id (expert 0's rows first).
        num_tokens_per_expert_G: int64 tensor, rows per global expert; sums to N.
        group: the EP group; global expert ``g`` lives on group rank ``g // E``.
        num_experts: G, the experts module's global expert count (the styles pass it). Every rank must agree on
            it: a rank whose counts have another length then fails on every rank with a clear error, instead of
            breaking the exchange. ``None``: the length of ``num_tokens_per_expert_G``.
        align: pad each local expert's rows to a multiple of this (1, 8, 16, 32).
        async_op: return a :class:`PendingDispatch` while the token all-to-all is in flight.

    Returns:
        :class:`Dispatched` (or :class:`PendingDispatch` when ``async_op``).

    Raises:
        ValueError: the expert count is not divisible by the EP degree; or, on every rank of the group, any rank's
            input is inconsistent (see :func:`~hyper_parallel.expert_parallel.counts_exchange.exchange_counts`).
    """
    p = get_platform()
    R = group.size
    G = int(num_tokens_per_expert_G.shape[0]) if num_experts is None else int(num_experts)
    if G % R:
        raise ValueError(f"expert parallel degree ({R}) must divide the number of experts ({G})")
    with p.profile_range("hyper_parallel.dispatch"):
        pending = _exchange(p, routed_input_ND, num_tokens_per_expert_G, group, R, G, align)
    return pending if async_op else pending.wait()


def _exchange(p, routed_input_ND, num_tokens_per_expert_G, group: Group, R: int, G: int, align: int):
    """Counts exchange (with the cross-rank checks), host sync, and the token all-to-all left in flight."""
    E = G // R
    counts = exchange_counts(routed_input_ND, num_tokens_per_expert_G, group, G)
    host_counts_RE, counts_RE = counts.host_counts_RE, counts.counts_RE
    input_splits = tuple(sum(counts.host_counts_G[r * E:(r + 1) * E]) for r in range(R))
    output_splits = tuple(sum(host_counts_RE[r * E:(r + 1) * E]) for r in range(R))
    meta_args = dict(group=group, input_splits=input_splits, output_splits=output_splits)
    received, handle = all_to_all_single_autograd(routed_input_ND, output_split_sizes=output_splits,
                                                  input_split_sizes=input_splits, group=group, async_op=True)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("dispatch over ranks %s: sending %s rows, receiving %s, rows per (rank, local expert) %s",
                   list(group.ranks), list(input_splits), list(output_splits), host_counts_RE)
    return PendingDispatch(received, handle, counts_RE, host_counts_RE, meta_args, align)


def token_combine(routed_output_PD, meta: DispatchMeta):
    """Undo :func:`token_dispatch`: rows back to their rank, in their original order (``[N, D]``)."""
    p = get_platform()
    with p.profile_range("hyper_parallel.unpermute"):
        back_TD = unpermute(routed_output_PD, meta.indices)
    with p.profile_range("hyper_parallel.combine"):
        return all_to_all_single_autograd(back_TD, output_split_sizes=meta.input_splits,
                                          input_split_sizes=meta.output_splits, group=meta.group)

