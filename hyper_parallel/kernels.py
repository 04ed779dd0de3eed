"""Compute kernels an adapter MAY replace with a faster one, with the neutral reference of each.

:class:`Kernels` is the second group of the contract (see :mod:`hyper_parallel.platform`): every member has a
working implementation written once on the shared tensor API, which every backend runs and every fast path is
checked against. An adapter that has a faster kernel subclasses :class:`Kernels`, overrides the member, and hands
an instance to its platform (``self.kernels = MyKernels(self)``); neutral code calls ``get_platform().kernels.<name>``.

>>> from hyper_parallel import get_platform
>>> slots = get_platform().kernels.permute_slots(counts_RE, 2, 4, 10, offsets_E)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hyper_parallel.functional import zeros_connected

if TYPE_CHECKING:  # pragma: no cover
    from hyper_parallel.platform import Platform

__all__ = ["Kernels"]


class Kernels:
    """The replaceable kernels of one platform. The methods here are the references.

    Args:
        platform: the platform whose factories the references use.
    """

    #: Build the dispatch permutation on the host from the counts dispatch already read back
    #: (:func:`~hyper_parallel.expert_parallel.permute.host_permute_indices`, then two tensors), instead of
    #: :meth:`permute_slots` and an indexed assignment on the device. For tensors in host memory with costly small
    #: ops (the MindSpore adapter on CPU sets it); on an accelerator it would be a host-to-device copy per dispatch.
    host_index_build: bool = False

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def expert_counts(self, ids, num_experts: int):
        """How many entries of ``ids`` (an integer tensor of any shape, values in ``[0, num_experts)``) name each
        expert; int64 ``[num_experts]``, on ``ids``' device. Bookkeeping: no gradient flows through it.

        The reference compares every id with every expert (``[N, E]`` booleans) and sums: no scatter, whose in-place
        forms differ across frameworks.
        """
        p = self.platform
        device = getattr(ids, "device", None)
        if 0 in tuple(ids.shape):  # a sum over zero rows is not reliably 0 on every backend
            return p.zeros((num_experts,), dtype="int64", device=device)
        return (ids.reshape(-1, 1) == p.arange(num_experts, device=device)).sum(0).to(p.dtype("int64"))

    def stable_order(self, ids_N):
        """The order that sorts the 1-D integer tensor ``ids_N`` ascending, ties in their original order; int64
        ``[N]``. Bookkeeping: no gradient flows through it."""
        return ids_N.argsort(stable=True).to(self.platform.dtype("int64"))

    def convert(self, x, dtype: str):
        """``x`` in ``dtype`` (a name, e.g. ``"int64"``), for bookkeeping tensors no gradient flows through: top-k's
        indices, counts, comparison masks. Differentiable values keep the framework's own cast."""
        return x.to(self.platform.dtype(dtype))

    def take_rows(self, x, index_N):
        """Rows ``index_N`` (int64 ``[N]``) of ``x``: ``x[index_N]``, ``[N, ...]``; differentiable (the gradient is
        autograd's accumulating scatter). The gathers of dispatch and of the pairs go through it: a backend whose
        indexing has a faster spelling for rows uses it (torch on CPU: ``index_select``, 3-6x faster than ``x[i]``
        below a million elements)."""
        return x[index_N]

    def use_fused_permute(self, counts_RE) -> bool:
        """Whether dispatch moves its rows with :meth:`permute_rows` (block copies, offsets from the device counts)
        instead of building an index and gathering through it. The reference: never (an adapter with a fused
        kernel says where it runs)."""
        return False

    def permute_rows(self, x, counts_RE, num_ranks: int, num_local_experts: int, expert_offsets_E, num_rows: int,
                     num_slots: int, to_expert_major: bool):
        """Rows between the rank-major order an all-to-all delivers (``[T, D]``) and the expert-major slots experts
        read (``[P, D]``, padding slots zero), in the direction ``to_expert_major`` says; the permute step of
        :mod:`~hyper_parallel.expert_parallel.permute` as a kernel of its own.

        Each (rank, expert) block of rows is contiguous on both sides, so a fused kernel copies blocks at offsets it
        derives from ``counts_RE`` on the device: no index is built or read. This reference builds the slots with
        :meth:`permute_slots` and moves the rows through them.

        Args:
            x: ``[T, D]`` rank-major rows (``to_expert_major``) or ``[P, D]`` expert-major slots.
            counts_RE: int64 ``[R*E]`` rows from rank r for local expert e (rank-major); they sum to ``num_rows``.
            num_ranks: R.
            num_local_experts: E.
            expert_offsets_E: int64 ``[E]`` start slot of each expert's group (padding included); or None when
                there is no padding (``num_slots == num_rows``): each group starts where the previous expert's rows
                end, which the kernel derives from ``counts_RE`` (no offsets copied to the device per dispatch).
            num_rows: T > 0.
            num_slots: P >= T.
            to_expert_major: the direction.

        Raises:
            ValueError: ``expert_offsets_E`` is None but there are padding slots.
        """
        if expert_offsets_E is None:
            if num_slots != num_rows:
                raise ValueError(f"permute_rows: expert_offsets_E may be None only without padding slots, got "
                                 f"{num_slots} slots for {num_rows} rows")
            per_expert_E = counts_RE.reshape(num_ranks, num_local_experts).sum(0)
            expert_offsets_E = per_expert_E.cumsum(0) - per_expert_E
        slots_T = self.permute_slots(counts_RE, num_ranks, num_local_experts, num_rows, expert_offsets_E)
        if not to_expert_major:
            return self.take_rows(x, slots_T)
        out = self.platform.zeros((num_slots, *x.shape[1:]), dtype=self.platform.dtype_name(x.dtype),
                                  device=getattr(x, "device", None))
        out[slots_T] = x
        return out

    def permute_slots(self, counts_RE, num_ranks: int, num_local_experts: int, num_rows: int, expert_offsets_E):
        """Slot in the expert-major buffer of every rank-major row (the index build of
        :func:`~hyper_parallel.expert_parallel.permute.build_permute_indices`); ``[T]`` int64.

        Vectorized with cumsum / repeat_interleave / arange, no loop over experts or ranks: each (rank, expert) block
        of rows is contiguous on both sides, so a row's slot is its block's destination start plus its offset inside
        the block. It launches ~10 small kernels, so on GPUs it is launch-bound (the torch adapter fuses it).

        Args:
            counts_RE: int64 ``[R*E]`` rows from rank r for local expert e (rank-major); ``num_rows`` = their sum > 0.
            num_ranks: R.
            num_local_experts: E.
            num_rows: T, the sum of ``counts_RE``.
            expert_offsets_E: int64 ``[E]`` start slot of each expert's group (padding included).
        """
        R, E, T = num_ranks, num_local_experts, num_rows
        counts_RE = counts_RE.reshape(-1)
        counts_ER = counts_RE.reshape(R, E).swapaxes(0, 1).contiguous()
        # destination start of block (e, r): the expert's group start + rows of lower ranks for that expert
        dst_start_ER = expert_offsets_E.reshape(E, 1) + counts_ER.cumsum(1) - counts_ER
        dst_start_RE = dst_start_ER.swapaxes(0, 1).contiguous().reshape(-1)
        # source start of block (r, e) in the rank-major buffer, and each row's offset inside its block
        src_start_RE = counts_RE.cumsum(0) - counts_RE
        offset_in_block_T = self.platform.arange(T, device=getattr(counts_RE, "device", None)) \
            - src_start_RE.repeat_interleave(counts_RE, 0)
        return dst_start_RE.repeat_interleave(counts_RE, 0) + offset_in_block_T

    def gather_pairs(self, x_TD, pairs_N, top_k: int):
        """The row of every (token, choice) pair: ``x_TD[pairs_N // top_k]``, ``[N, D]``; the first step of the
        routed experts, whose gradient is each token's sum over its pairs (autograd's accumulating scatter here; a
        fused kernel gathers it per token, the backward twin of :meth:`combine_pairs`).

        Args:
            x_TD: ``[T, D]`` tokens.
            pairs_N: int64 ``[N]`` unique flat pair indices ``token * top_k + choice``, N > 0.
            top_k: K.
        """
        return self.take_rows(x_TD, pairs_N // top_k)

    def combine_pairs(self, rows_ND, scores_N, pairs_N, num_tokens: int, top_k: int):
        """Every token's output: the sum over its kept (token, choice) pairs of ``score * row``; ``[T, D]`` in the
        rows' dtype.

        ``pairs_N`` are the pairs' flat indices ``token * top_k + choice`` (unique); a token without kept pairs
        gets zeros. The weighting and the sum run in float32 whatever the rows' dtype (bf16 rows times float32
        router scores, summed over top-k, lose what the scores' precision was kept for), and the result is cast
        back: bf16 in, bf16 out. Pairs fill unique slots of a ``[T*K, D]`` buffer by a plain indexed assignment
        (differentiable everywhere, unlike scatter-add), then a sum over K.
        """
        p = self.platform
        D = rows_ND.shape[-1]
        if rows_ND.shape[0] == 0:
            return zeros_connected(rows_ND, (num_tokens, D))
        weighted_ND = rows_ND.float() * scores_N.float().reshape(-1, 1)
        slots = p.zeros((num_tokens * top_k, D), dtype="float32", device=getattr(rows_ND, "device", None))
        slots[pairs_N] = weighted_ND
        return slots.reshape(num_tokens, top_k, D).sum(1).to(rows_ND.dtype)

    def swiglu(self, h, g):
        """The SwiGLU activation ``silu(h) * g`` (``silu(h) = h * sigmoid(h)``), elementwise; the experts' hidden
        activation."""
        return h * h.sigmoid() * g

    def matmul(self, a_NK, b_KM):
        """``a_NK @ b_KM`` for 2-D operands; ``[N, M]``. A kernel so that a framework whose 2-D matmul misbehaves
        can route it elsewhere (the MindSpore adapter does)."""
        return a_NK @ b_KM

    def gate_up(self, x_ND, w1_EHD, w3_EHD, num_tokens_per_expert: Sequence[int]):
        """The experts' two input projections, ``(x @ w1[e].T, x @ w3[e].T)`` per expert's rows; two ``[N, H]``.

        Two :meth:`grouped_mm` calls here. A backend whose per-op cost dominates may run them as one, on the two
        weights side by side (the MindSpore adapter does); the values are the same products either way.
        """
        return (self.grouped_mm(x_ND, w1_EHD.mT, num_tokens_per_expert),
                self.grouped_mm(x_ND, w3_EHD.mT, num_tokens_per_expert))

    def grouped_mm(self, x_NK, w_EKM, num_tokens_per_expert: Sequence[int]):
        """Rows ``[offset_e, offset_e + n_e)`` of ``x_NK`` times ``w_EKM[e]``, for every expert ``e``; ``[N, M]``.

        The per-expert loop. ``num_tokens_per_expert`` are host ints summing to N.

        Raises:
            ValueError: the counts do not match ``w_EKM``'s experts or do not sum to N.
        """
        counts = [int(n) for n in num_tokens_per_expert]
        if len(counts) != w_EKM.shape[0] or sum(counts) != x_NK.shape[0] or (counts and min(counts) < 0):
            raise ValueError(f"grouped_mm: num_tokens_per_expert must be {w_EKM.shape[0]} non-negative counts "
                             f"summing to the {x_NK.shape[0]} rows, got {counts}")
        outs, start = [], 0
        # unbind, not w_EKM[e]: the gradient of an index is a full-size [E, K, M] tensor per expert, of unbind one
        # slice each (measured 6-56x faster backward on a GPU)
        for n, w_KM in zip(counts, w_EKM.unbind(0)):
            if n:  # empty experts are skipped: zero-size matmuls are a trap on some backends
                outs.append(x_NK[start:start + n] @ w_KM)
            start += n
        if not outs:
            return zeros_connected(x_NK, (0, w_EKM.shape[-1]))
        return outs[0] if len(outs) == 1 else self.platform.cat(outs)
