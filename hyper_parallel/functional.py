"""Differentiable collectives, written once on the contract's single autograd primitive.

These are plain functions over :func:`~hyper_parallel.get_platform` (the third group of the contract: written once
on top of it, never by an adapter). Each is a pair of plain collectives, the forward one and its adjoint, joined by
:meth:`Platform.autograd_function <hyper_parallel.platform.Platform.autograd_function>`. Because the adjoint is
itself a plain collective on the same group, every rank issues the same collective sequence in backward as in
forward, on every backend.

| function                        | forward                        | backward (adjoint)                  |
|---------------------------------|--------------------------------|-------------------------------------|
| :func:`all_to_all_single_autograd` | all_to_all_single(in -> out) | all_to_all_single(out -> in)        |
| :func:`all_gather_autograd`     | all_gather (concat dim 0)      | reduce_scatter sum                  |
| :func:`reduce_scatter_autograd` | reduce_scatter sum             | all_gather                          |
| :func:`all_reduce_autograd`     | all_reduce sum                 | all_reduce sum                      |
| :func:`identity_fwd_all_reduce_bwd` | identity                   | all_reduce sum (a Partial gradient) |

Split sizes are keyword-only and named as in ``torch.distributed.all_to_all_single``: ``output_split_sizes`` rows
received from each member, ``input_split_sizes`` rows sent to each.

>>> from hyper_parallel.functional import all_to_all_single_autograd
>>> y = all_to_all_single_autograd(x, output_split_sizes=[3, 1], input_split_sizes=[2, 2])   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hyper_parallel._select import get_platform

if TYPE_CHECKING:  # pragma: no cover
    from hyper_parallel.platform import Group

__all__ = ["all_gather_autograd", "all_reduce_autograd", "all_to_all_single_autograd", "identity_fwd_all_reduce_bwd",
           "reduce_scatter_autograd", "zeros_connected"]


def all_to_all_single_autograd(x, *, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
                               group: Group | None = None, async_op: bool = False):
    """All-to-all of rows with uneven splits whose gradient is the same exchange with the splits swapped.

    Args:
        x: rows to send, ``sum(input_split_sizes)`` of them.
        output_split_sizes: rows received from each group member (Python ints).
        input_split_sizes: rows sent to each group member (Python ints).
        group: the group (``None`` = world).
        async_op: return ``(output, handle)`` before the exchange completes; read the output only after
            ``handle.wait()`` (work issued in between overlaps the exchange). The backward is synchronous.

    Returns:
        The received rows, ``sum(output_split_sizes)`` of them (with a handle when ``async_op``).

    Raises:
        ValueError: split sizes negative, of the wrong length, or not summing to the rows.
    """
    p = get_platform()
    out_splits, in_splits = list(output_split_sizes), list(input_split_sizes)
    in_shape = tuple(x.shape)
    handles = []

    def forward(t):
        out, handle = p.all_to_all_single(t, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group,
                                          async_op=async_op)
        handles.append(handle)
        return out

    def backward(g):
        return p.all_to_all_single(g, output_shape=in_shape, output_split_sizes=in_splits,
                                   input_split_sizes=out_splits, group=group)[0]

    y = p.autograd_function(forward, backward)(x)
    return (y, handles[0]) if async_op else y


def all_gather_autograd(x, *, group: Group | None = None):
    """All-gather along dim 0; the gradient is the reduce-scatter (sum) of the output gradient."""
    p = get_platform()
    return p.autograd_function(lambda t: p.all_gather_into_tensor(t, group=group),
                               lambda g: p.reduce_scatter_tensor(g, "sum", group=group))(x)


def reduce_scatter_autograd(x, *, group: Group | None = None):
    """Reduce-scatter (sum) along dim 0; the gradient is the all-gather of the output gradient."""
    p = get_platform()
    return p.autograd_function(lambda t: p.reduce_scatter_tensor(t, "sum", group=group),
                               lambda g: p.all_gather_into_tensor(g, group=group))(x)


def all_reduce_autograd(x, *, group: Group | None = None):
    """All-reduce (sum); the gradient is the all-reduce (sum) of the output gradient."""
    p = get_platform()

    def reduce(t):
        return p.all_reduce(t, "sum", group=group)

    return p.autograd_function(reduce, reduce)(x)


def identity_fwd_all_reduce_bwd(x, *, group: Group | None = None):
    """Identity forward, all-reduce (sum) backward: turns a per-rank partial gradient into the full one.

    This is what ``DTensor.to_local(grad_placements=[Partial()])`` and a replicated input that feeds sharded
    compute need.
    """
    p = get_platform()
    return p.autograd_function(lambda t: t, lambda g: p.all_reduce(g, "sum", group=group))(x)


def zeros_connected(x, shape: Sequence[int]):
    """Zeros of ``shape`` that are still a function of ``x`` (with a zero gradient).

    For empty work (a rank that received no tokens): the result keeps the rank in the autograd graph, so its
    backward issues the same collectives as every other rank's, without indexing or concatenating zero-size
    tensors (which have no gradient kernels on some backends, MindSpore CPU among them).
    """
    p = get_platform()
    out_shape, in_shape = tuple(shape), tuple(x.shape)
    kind, device = p.dtype_name(x.dtype), getattr(x, "device", None)
    return p.autograd_function(lambda t: p.zeros(out_shape, dtype=kind, device=device),
                               lambda g: p.zeros(in_shape, dtype=kind, device=device))(x)
