"""Placements: how a tensor is laid out over one mesh axis. Same names and meaning as ``torch.distributed.tensor``.

* ``Shard(dim)``: split along tensor dim ``dim`` with ``torch.chunk`` semantics (the first ranks get
  ``ceil(n / k)`` rows, trailing ranks may get fewer or none);
* ``StridedShard(dim, split_factor)``: dim ``dim`` is ``split_factor`` consecutive equal parts, each chunked over the
  ranks; a rank holds its chunk of every part, in order (torch's ``_StridedShard``; e.g. tensor parallelism over a
  fused ``[gate; up]`` weight);
* ``Replicate()``: every rank of the axis holds the whole tensor;
* ``Partial(reduce_op="sum")``: every rank holds a partial value; the tensor is their sum.

>>> Shard(0), Replicate(), Partial()
(Shard(dim=0), Replicate(), Partial(reduce_op='sum'))
>>> StridedShard(1, split_factor=2)
StridedShard(dim=1, split_factor=2)
"""

from __future__ import annotations

import dataclasses

__all__ = ["Placement", "Shard", "StridedShard", "Replicate", "Partial", "chunk_sizes", "chunk_offsets",
           "strided_indices"]


class Placement:
    """Base class of the placements.

    As in torch, :meth:`is_shard` is true for the contiguous ``Shard`` only: code that cuts ``torch.chunk`` pieces
    (``chunk_offsets``) must not take a ``StridedShard`` for one. :meth:`is_strided_shard` tests for the strided
    kind, :meth:`is_shard_like` for either (the dim is split over the axis, in some order).
    """

    def is_shard(self, dim: int | None = None) -> bool:
        """A contiguous ``Shard`` (of ``dim``, if given); false for ``StridedShard``."""
        return isinstance(self, Shard) and (dim is None or self.dim == dim)

    def is_strided_shard(self, dim: int | None = None) -> bool:
        """A ``StridedShard`` (of ``dim``, if given)."""
        return isinstance(self, StridedShard) and (dim is None or self.dim == dim)

    def is_shard_like(self, dim: int | None = None) -> bool:
        """``Shard`` or ``StridedShard`` (of ``dim``, if given): the dim is split over the mesh axis."""
        return self.is_shard(dim) or self.is_strided_shard(dim)

    def is_replicate(self) -> bool:
        return isinstance(self, Replicate)

    def is_partial(self) -> bool:
        return isinstance(self, Partial)


@dataclasses.dataclass(frozen=True)
class Shard(Placement):
    """Split along tensor dim ``dim`` (negative dims count from the end and are normalised against the tensor)."""

    dim: int

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise TypeError(f"Shard(dim) takes an int, got {self.dim!r}")


@dataclasses.dataclass(frozen=True)
class StridedShard(Placement):
    """Split tensor dim ``dim`` in ``split_factor`` consecutive equal parts, chunk EACH part over the mesh axis; rank
    ``r`` holds chunk ``r`` of part 0, chunk ``r`` of part 1, ... concatenated in that order.

    The same layout as torch's ``torch.distributed.tensor.placement_types._StridedShard(dim, split_factor=...)`` on
    one mesh axis. It shards a fused weight such as ``gate_up_proj`` ``[E, 2H, D]`` (``[gate; up]`` along dim 1)
    for tensor parallelism: ``StridedShard(1, split_factor=2)`` over ``n`` ranks gives rank ``r`` the rows
    ``[gate_r; up_r]``. Rows of a dim of 8 with ``split_factor=2`` over 2 ranks::

        parts:   [0 1 2 3 | 4 5 6 7]
        rank 0:  [0 1 | 4 5]          (Shard(0) would give [0 1 2 3])
        rank 1:  [2 3 | 6 7]

    The dim's size must be divisible by ``split_factor * axis size`` (no uneven chunks), checked wherever a layout
    meets a shape. ``StridedShard(d, 1)`` holds what ``Shard(d)`` holds on even sizes, but is a different placement.

    Args:
        dim: the tensor dim (negative dims count from the end and are normalised against the tensor).
        split_factor: the number of consecutive parts, an int >= 1.
    """

    dim: int
    split_factor: int

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise TypeError(f"StridedShard(dim) takes an int, got {self.dim!r}")
        if isinstance(self.split_factor, bool) or not isinstance(self.split_factor, int):
            raise TypeError(f"StridedShard(split_factor) takes an int >= 1, got {self.split_factor!r}")
        if self.split_factor < 1:
            raise ValueError(f"StridedShard(split_factor) must be an int >= 1, got {self.split_factor}")


@dataclasses.dataclass(frozen=True)
class Replicate(Placement):
    """Every rank of the mesh axis holds the full tensor."""


@dataclasses.dataclass(frozen=True)
class Partial(Placement):
    """Every rank holds a partial value; the tensor is the reduction (``"sum"``) of them."""

    reduce_op: str = "sum"

    def __post_init__(self):
        if self.reduce_op != "sum":
            raise ValueError(f"Partial supports reduce_op='sum' only, got {self.reduce_op!r}")


def chunk_sizes(size: int, parts: int) -> list[int]:
    """Per-rank sizes of a dim of ``size`` split in ``parts`` the way ``torch.chunk`` does.

    >>> chunk_sizes(7, 4), chunk_sizes(2, 4)
    ([2, 2, 2, 1], [1, 1, 0, 0])
    """
    step = -(-size // parts) if size else 0
    return [max(0, min(step, size - i * step)) for i in range(parts)]


def chunk_offsets(size: int, parts: int) -> list[int]:
    """Start offset of each rank's chunk (see :func:`chunk_sizes`)."""
    sizes = chunk_sizes(size, parts)
    return [sum(sizes[:i]) for i in range(parts)]


def strided_indices(size: int, split_factor: int, parts: int, index: int) -> list[int]:
    """The rows of a dim of ``size`` that rank ``index`` of ``parts`` holds under ``StridedShard(split_factor=)``.

    >>> strided_indices(8, 2, 2, 0), strided_indices(8, 2, 2, 1)
    ([0, 1, 4, 5], [2, 3, 6, 7])

    Raises:
        ValueError: ``size`` is not divisible by ``split_factor * parts``.
    """
    if size % (split_factor * parts):
        raise ValueError(f"StridedShard needs the dim's size divisible by split_factor * mesh axis size = "
                         f"{split_factor} * {parts} = {split_factor * parts}, got size {size}")
    part, m = size // split_factor, size // (split_factor * parts)
    return [j * part + index * m + i for j in range(split_factor) for i in range(m)]
