"""Placements: how a tensor is laid out over one mesh axis. Same names and meaning as ``torch.distributed.tensor``.

* ``Shard(dim)``: split along tensor dim ``dim`` with ``torch.chunk`` semantics (the first ranks get
  ``ceil(n / k)`` rows, trailing ranks may get fewer or none);
* ``Replicate()``: every rank of the axis holds the whole tensor;
* ``Partial(reduce_op="sum")``: every rank holds a partial value; the tensor is their sum.

>>> Shard(0), Replicate(), Partial()
(Shard(dim=0), Replicate(), Partial(reduce_op='sum'))
"""

from __future__ import annotations

import dataclasses

__all__ = ["Placement", "Shard", "Replicate", "Partial", "chunk_sizes", "chunk_offsets"]


class Placement:
    """Base class of the three placements."""

    def is_shard(self, dim: int | None = None) -> bool:
        return isinstance(self, Shard) and (dim is None or self.dim == dim)

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
