"""Differentiable collectives, written once on the contract's single autograd primitive.

Each is a pair of plain collectives: the forward one and its adjoint, joined by
:meth:`Platform.autograd_function`. Because the adjoint is itself a plain collective on the same group, every rank
issues the same collective sequence in backward as in forward, on every backend.

| forward                         | backward (adjoint)                     |
|---------------------------------|----------------------------------------|
| all_to_all_single(in -> out)    | all_to_all_single(out -> in)           |
| all_gather (concat dim 0)       | reduce_scatter sum                     |
| reduce_scatter sum              | all_gather                             |
| all_reduce sum                  | all_reduce sum                         |
| identity                        | all_reduce sum (a Partial gradient)    |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from hyper_parallel.platform import Group


class DifferentiableCollectives:
    """Mixin of :class:`~hyper_parallel.platform.Platform`: reachable as ``get_platform().<name>``."""

    def differentiable_all_to_all_single(self, x, input_splits: Sequence[int], output_splits: Sequence[int],
                                         group: "Group | None" = None, async_op: bool = False):
        """All-to-all of rows with uneven splits whose gradient is the same exchange with the splits swapped.

        Args:
            x: rows to send, ``sum(input_splits)`` of them.
            input_splits: rows sent to each group member (Python ints).
            output_splits: rows received from each group member (Python ints).
            group: the group (``None`` = world).
            async_op: return ``(output, handle)`` before the exchange completes; read the output only after
                ``handle.wait()`` (work issued in between overlaps the exchange). The backward is synchronous.

        Returns:
            The received rows, ``sum(output_splits)`` of them (with a handle when ``async_op``).
        """
        input_splits, output_splits = list(input_splits), list(output_splits)
        in_shape = tuple(x.shape)
        out_shape = (sum(output_splits), *in_shape[1:])
        handles = []

        def forward(t):
            out, handle = self.all_to_all_single(t, out_shape, input_splits, output_splits, group=group,
                                                 async_op=async_op)
            handles.append(handle)
            return out

        def backward(g):
            return self.all_to_all_single(g, in_shape, output_splits, input_splits, group=group)[0]

        y = self.autograd_function(forward, backward)(x)
        return (y, handles[0]) if async_op else y

    def differentiable_all_gather(self, x, group: "Group | None" = None):
        """All-gather along dim 0; the gradient is the reduce-scatter (sum) of the output gradient."""
        return self.autograd_function(
            lambda t: self.all_gather_into_tensor(t, group=group),
            lambda g: self.reduce_scatter_tensor(g, "sum", group=group),
        )(x)

    def differentiable_reduce_scatter(self, x, group: "Group | None" = None):
        """Reduce-scatter (sum) along dim 0; the gradient is the all-gather of the output gradient."""
        return self.autograd_function(
            lambda t: self.reduce_scatter_tensor(t, "sum", group=group),
            lambda g: self.all_gather_into_tensor(g, group=group),
        )(x)

    def differentiable_all_reduce(self, x, group: "Group | None" = None):
        """All-reduce (sum); the gradient is the all-reduce (sum) of the output gradient."""
        reduce = lambda t: self.all_reduce(t, "sum", group=group)  # noqa: E731
        return self.autograd_function(reduce, reduce)(x)

    def identity_fwd_all_reduce_bwd(self, x, group: "Group | None" = None):
        """Identity forward, all-reduce (sum) backward: turns a per-rank partial gradient into the full one.

        This is what ``DTensor.to_local(grad_placements=[Partial()])`` and a replicated input that feeds
        sharded compute need.
        """
        return self.autograd_function(lambda t: t, lambda g: self.all_reduce(g, "sum", group=group))(x)

    def zeros_connected(self, x, shape: Sequence[int]):
        """Zeros of ``shape`` that are still a function of ``x`` (with a zero gradient).

        For empty work (a rank that received no tokens): the result keeps the rank in the autograd graph, so its
        backward issues the same collectives as every other rank's, without indexing or concatenating zero-size
        tensors (which have no gradient kernels on some backends, MindSpore CPU among them).
        """
        out_shape, in_shape = tuple(shape), tuple(x.shape)
        kind, device = self.dtype_name(x.dtype), getattr(x, "device", None)
        return self.autograd_function(lambda t: self.zeros(out_shape, dtype=kind, device=device),
                                      lambda g: self.zeros(in_shape, dtype=kind, device=device))(x)

    def permute_slots(self, counts_RE, num_ranks: int, num_local_experts: int, num_rows: int, expert_offsets_E):
        """Slot in the expert-major buffer of every rank-major row (the index build of
        :func:`~hyper_parallel.expert_parallel.permute.build_permute_indices`); ``[T]`` int64.

        Vectorized with cumsum / repeat_interleave / arange, no loop over experts or ranks: each (rank, expert) block
        of rows is contiguous on both sides, so a row's slot is its block's destination start plus its offset inside
        the block. This is the reference; an adapter may override it with a fused kernel (it launches ~10 small
        kernels, so on GPUs it is launch-bound).

        Args:
            counts_RE: int64 ``[R*E]`` rows from rank r for local expert e (rank-major); ``num_rows`` = their sum > 0.
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
        offset_in_block_T = self.arange(T, device=getattr(counts_RE, "device", None)) \
            - src_start_RE.repeat_interleave(counts_RE, 0)
        return dst_start_RE.repeat_interleave(counts_RE, 0) + offset_in_block_T

    def grouped_mm(self, x_NK, w_EKM, num_tokens_per_expert: Sequence[int]):
        """Rows ``[offset_e, offset_e + n_e)`` of ``x_NK`` times ``w_EKM[e]``, for every expert ``e``; ``[N, M]``.

        This is the per-expert loop, the reference every backend runs; an adapter may override it with a batched
        kernel (torch's ``_grouped_mm`` on CUDA). ``num_tokens_per_expert`` are host ints summing to N.

        Raises:
            ValueError: the counts do not match ``w_EKM``'s experts or do not sum to N.
        """
        counts = [int(n) for n in num_tokens_per_expert]
        if len(counts) != w_EKM.shape[0] or sum(counts) != x_NK.shape[0] or min(counts, default=0) < 0:
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
            return self.zeros_connected(x_NK, (0, w_EKM.shape[-1]))
        return outs[0] if len(outs) == 1 else self.cat(outs)
