"""Token permutation between the rank-major order an all-to-all delivers and the expert-major order experts want.

Pure index math on the platform's tensors: the device work is a fixed sequence of cumsum / repeat_interleave /
arange / indexing ops, with no Python loop over experts or ranks and no ``.item()``. The host already knows every
count (dispatch syncs them once, for the all-to-all split sizes), so it derives the totals the index build needs
as Python ints.

Shape legend: ``R`` ranks of the EP group, ``E`` local experts, ``T`` tokens received (``sum`` of the counts),
``P`` rows after alignment padding (``P == T`` when ``align == 1``), ``D`` hidden size.

After the token all-to-all, rows arrive rank-major::

    [rank0: expert0 | expert1 | ...][rank1: expert0 | expert1 | ...] ...

Experts want them expert-major, each expert's group optionally padded to a multiple of ``align`` rows (grouped GEMM
kernels want 8/16/32)::

    [expert0: rank0 | rank1 | ... | pad][expert1: rank0 | rank1 | ... | pad] ...

With ``align > 1`` every expert gets at least ``align`` rows, empty experts included, and padded slots read an
appended zero row, so they contribute nothing and receive no gradient.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.functional import zeros_connected

__all__ = ["PermuteIndices", "aligned_counts", "build_permute_indices", "host_permute_indices", "permute",
           "unpermute"]

ALIGNMENTS = (1, 8, 16, 32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PermuteIndices:
    """Everything :func:`permute` and :func:`unpermute` need, built once per dispatch."""

    source_row_P: object
    """For each expert-major slot, the rank-major row it reads; ``T`` (the appended zero row) for padding. None
    when ``fused``."""
    slot_of_row_T: object
    """For each rank-major row, its slot in the expert-major buffer (the inverse, used by unpermute). None when
    ``fused``."""
    num_tokens_per_expert: tuple[int, ...]
    """Rows per local expert after padding (host ints); what the experts consume."""
    expert_offsets: tuple[int, ...]
    """Start slot of each expert's group (host ints)."""
    num_rows: int
    """``T``: rows received."""
    num_slots: int
    """``P``: rows after padding."""
    counts_RE: object = None
    """When ``fused``: int64 ``[R*E]`` rows per (rank, local expert) on the device."""
    offsets_E: object = None
    """When ``fused`` and padded: int64 ``[E]`` ``expert_offsets`` on the device (None without padding: the kernel
    derives them from the counts)."""
    num_ranks: int = 0
    """``R``."""
    num_local_experts: int = 0
    """``E``."""

    @property
    def fused(self) -> bool:
        """The rows move with the platform's ``Kernels.permute_rows`` (block copies from the device counts), not
        through the two indices, which are not built."""
        return self.counts_RE is not None


def aligned_counts(tokens_per_expert: Sequence[int], align: int) -> list[int]:
    """Rows each expert occupies: its tokens rounded up to ``align``, and at least ``align`` when ``align > 1``.

    >>> aligned_counts([0, 3, 8, 9], 8)
    [8, 8, 8, 16]
    """
    if align == 1:
        return list(tokens_per_expert)
    return [max(align, -(-t // align) * align) for t in tokens_per_expert]


def _check(counts: Sequence[int], num_ranks: int, num_local_experts: int, align: int) -> None:
    if len(counts) != num_ranks * num_local_experts:
        raise ValueError(f"counts must have num_ranks * num_local_experts = {num_ranks} * {num_local_experts} = "
                         f"{num_ranks * num_local_experts} entries (rank-major), got {len(counts)}")
    if counts and min(counts) < 0:
        raise ValueError(f"token counts must be non-negative, got {list(counts)}")
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {list(ALIGNMENTS)}, got {align!r}")


def build_permute_indices(counts_RE, host_counts_RE: Sequence[int], num_ranks: int, num_local_experts: int, *,
                          align: int = 1) -> PermuteIndices:
    """Build the rank-major -> expert-major permutation.

    Args:
        counts_RE: int64 tensor ``[R*E]`` on the device; entry ``r*E + e`` is the number of rows from rank ``r``
            for local expert ``e``.
        host_counts_RE: the same counts as Python ints (already on the host: dispatch synced them once).
        num_ranks: ``R``.
        num_local_experts: ``E``.
        align: pad each expert's group to a multiple of this (1, 8, 16 or 32).

    Raises:
        ValueError: counts of the wrong length or negative; an unsupported ``align``.
    """
    p = get_platform()
    host_counts_RE = list(map(int, host_counts_RE))
    _check(host_counts_RE, num_ranks, num_local_experts, align)
    R, E = num_ranks, num_local_experts
    # built-ins over the lists, no Python loop per expert: this runs on the host between dispatch's sync and the
    # permute (hundreds of experts, on every dispatch)
    tokens_per_expert = list(map(sum, zip(*(host_counts_RE[r * E:(r + 1) * E] for r in range(R)))))
    per_expert = aligned_counts(tokens_per_expert, align)
    offsets = [0, *itertools.accumulate(per_expert[:-1])]
    T, P = sum(tokens_per_expert), sum(per_expert)
    device = getattr(counts_RE, "device", None)
    if T and p.kernels.use_fused_permute(counts_RE):
        # without padding the kernel derives the group starts from the counts: no host-to-device copy
        offsets_E = p.tensor(offsets, dtype="int64", device=device) if P != T else None
        return PermuteIndices(source_row_P=None, slot_of_row_T=None, num_tokens_per_expert=tuple(per_expert),
                              expert_offsets=tuple(offsets), num_rows=T, num_slots=P,
                              counts_RE=counts_RE.reshape(-1), offsets_E=offsets_E, num_ranks=R, num_local_experts=E)
    if p.kernels.host_index_build:
        source_np, slots_np = host_permute_indices(host_counts_RE, R, E, offsets, P)
        return PermuteIndices(source_row_P=p.tensor(source_np, dtype="int64", device=device),
                              slot_of_row_T=p.tensor(slots_np, dtype="int64", device=device),
                              num_tokens_per_expert=tuple(per_expert), expert_offsets=tuple(offsets),
                              num_rows=T, num_slots=P)
    source_row_P = p.zeros((P,), dtype="int64", device=device) + T  # padding reads the zero row
    if T == 0:  # nothing to place (and repeat_interleave with all-zero repeats is a trap on some backends)
        slot_of_row_T = p.zeros((0,), dtype="int64", device=device)
    else:
        slot_of_row_T = p.kernels.permute_slots(counts_RE, R, E, T, p.tensor(offsets, dtype="int64", device=device))
        source_row_P[slot_of_row_T] = p.arange(T, device=device)
    return PermuteIndices(source_row_P=source_row_P, slot_of_row_T=slot_of_row_T,
                          num_tokens_per_expert=tuple(per_expert), expert_offsets=tuple(offsets),
                          num_rows=T, num_slots=P)


def _gather_slots(x_TD, indices: PermuteIndices):
    """``[T, D]`` -> ``[P, D]``: slot ``s`` reads row ``source_row_P[s]`` (padding reads zeros)."""
    if indices.fused:
        return _moved(x_TD, indices, to_expert_major=True)
    if indices.num_slots == indices.num_rows:  # no padding: a pure permutation, no zero row to append
        return get_platform().kernels.take_rows(x_TD, indices.source_row_P)
    p = get_platform()
    zero_row = p.zeros((1, *x_TD.shape[1:]), dtype=p.dtype_name(x_TD.dtype), device=getattr(x_TD, "device", None))
    return p.kernels.take_rows(p.cat([x_TD, zero_row]), indices.source_row_P)


def _gather_rows(y_PD, indices: PermuteIndices):
    """``[P, D]`` -> ``[T, D]``: row ``t`` reads slot ``slot_of_row_T[t]`` (padding slots are dropped)."""
    if indices.fused:
        return _moved(y_PD, indices, to_expert_major=False)
    return get_platform().kernels.take_rows(y_PD, indices.slot_of_row_T)


def _moved(x, indices: PermuteIndices, *, to_expert_major: bool):
    return get_platform().kernels.permute_rows(x, indices.counts_RE, indices.num_ranks, indices.num_local_experts,
                                               indices.offsets_E, indices.num_rows, indices.num_slots,
                                               to_expert_major)


def host_permute_indices(host_counts_RE: Sequence[int], num_ranks: int, num_local_experts: int,
                         expert_offsets_E: Sequence[int], num_slots: int) -> tuple:
    """``(source_row_P, slot_of_row_T)`` as int64 NumPy arrays, from the host counts (the index build of
    :func:`build_permute_indices` on the host).

    For an adapter whose tensors live in host memory and whose small ops are expensive (MindSpore on CPU: each
    op ~1 ms, ``repeat_interleave`` ~30 ms), where the counts are on the host already: NumPy builds both indices
    in microseconds and the adapter makes two tensors of them, instead of ~10 framework ops.
    """
    import numpy as np  # here: importing the package loads no NumPy

    R, E = num_ranks, num_local_experts
    counts_RE = np.asarray(host_counts_RE, dtype=np.int64).reshape(R, E)
    T = int(counts_RE.sum())
    # a row's slot = its rank-major index + (its block's destination start - its block's source start)
    dst_start_RE = np.asarray(expert_offsets_E, dtype=np.int64)[None, :] + np.cumsum(counts_RE, 0) - counts_RE
    src_start_RE = (np.cumsum(counts_RE.reshape(-1)) - counts_RE.reshape(-1)).reshape(R, E)
    slot_of_row_T = np.repeat((dst_start_RE - src_start_RE).reshape(-1), counts_RE.reshape(-1)) + np.arange(T)
    source_row_P = np.full(num_slots, T, dtype=np.int64)  # padding reads the zero row
    source_row_P[slot_of_row_T] = np.arange(T)
    return source_row_P, slot_of_row_T


def permute(x_TD, indices: PermuteIndices):
    """Rank-major rows ``[T, D]`` -> expert-major slots ``[P, D]`` (padding slots are zero). Differentiable; a
    rank with no rows still returns a tensor connected to ``x_TD``'s graph.

    Both directions are gathers: every row lands in exactly one slot, so the gradient of this gather is the gather
    by the inverse permutation (:func:`unpermute`'s), which dispatch already holds. Autograd's own gradient of an
    index is an accumulating scatter into a zeroed buffer, about twice the memory traffic; the values are the
    same bit for bit (each row receives exactly one addend)."""
    if indices.num_rows == 0:
        return zeros_connected(x_TD, (indices.num_slots, *x_TD.shape[1:]))
    op = get_platform().autograd_function(lambda x: _gather_slots(x, indices), lambda g: _gather_rows(g, indices))
    return op(x_TD)


def unpermute(y_PD, indices: PermuteIndices):
    """Expert-major slots ``[P, D]`` -> rank-major rows ``[T, D]`` (padding slots are dropped). Differentiable;
    its gradient is :func:`permute`'s gather (padding slots get zeros)."""
    if indices.num_rows == 0:
        return zeros_connected(y_PD, (0, *y_PD.shape[1:]))
    op = get_platform().autograd_function(lambda y: _gather_rows(y, indices), lambda g: _gather_slots(g, indices))
    return op(y_PD)

