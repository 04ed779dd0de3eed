"""Which blocks of a global tensor a rank holds under a layout, as boxes (offsets and lengths per dim).

A ``Shard`` dim is one contiguous run (``torch.chunk`` sizes); a ``StridedShard(d, s)`` dim is ``s`` runs, one per
part (merged where they touch); an unsplit dim is one run over the whole dim. A rank's local tensor is the product
of its runs: every combination is one box, which lands at a known place in the local tensor. A checkpoint stores
boxes; loading intersects the boxes a rank needs with the boxes saved.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from hyper_parallel.dtensor.placement import Placement, chunk_offsets, chunk_sizes, strided_indices

__all__ = ["Box", "intersect", "layout_boxes", "volume"]


@dataclasses.dataclass(frozen=True)
class Box:
    """A block of a global tensor: ``offsets``/``lengths`` per dim, and where it sits in the holder's local tensor
    (``local``: offsets per dim)."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    local: tuple[int, ...]

    def global_index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.lengths))

    def local_index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.local, self.lengths))


def volume(lengths: Sequence[int]) -> int:
    return math.prod(lengths)


def _runs(size: int, placement: Placement | None, parts: int, index: int) -> list[tuple[int, int, int]]:
    """``(global start, length, local start)`` of the runs of one dim a rank holds."""
    if placement is None:
        return [(0, size, 0)]
    if placement.is_shard():
        return [(chunk_offsets(size, parts)[index], chunk_sizes(size, parts)[index], 0)]
    rows = strided_indices(size, placement.split_factor, parts, index)  # checks divisibility
    runs: list[tuple[int, int, int]] = []
    for local, row in enumerate(rows):
        if runs and runs[-1][0] + runs[-1][1] == row:
            start, length, at = runs[-1]
            runs[-1] = (start, length + 1, at)
        else:
            runs.append((row, 1, local))
    return runs


def layout_boxes(shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
                 placements: Sequence[Placement], what: str = "tensor") -> tuple[tuple[int, ...], list[Box]]:
    """``(local shape, boxes)`` of the rank at ``coordinate`` of a mesh of ``mesh_shape`` under ``placements``
    (a tensor of global ``shape``). Empty boxes (an uneven shard's empty chunk) are left out.

    Raises:
        ValueError: a ``Partial`` placement (a checkpoint stores values, not partial sums), or a dim split on two
            mesh axes.
    """
    shape = tuple(int(s) for s in shape)
    per_dim: list[list[tuple[int, int, int]]] = [[(0, s, 0)] for s in shape]
    split_by: dict[int, int] = {}
    for axis, pl in enumerate(placements):
        if pl.is_replicate():
            continue
        if pl.is_partial():
            raise ValueError(f"checkpoint: {what} is laid out with {pl} on mesh axis {axis}; a checkpoint stores "
                             "values, not partial sums: redistribute it to Replicate or Shard first")
        dim = pl.dim % len(shape) if shape else pl.dim
        if dim in split_by:
            raise ValueError(f"checkpoint: {what} splits dim {dim} on mesh axes {split_by[dim]} and {axis}; one "
                             "dim may be split on one mesh axis only")
        split_by[dim] = axis
        per_dim[dim] = _runs(shape[dim], pl, int(mesh_shape[axis]), int(coordinate[axis]))
    local_shape = tuple(sum(r[1] for r in runs) for runs in per_dim)
    boxes = []
    for combo in itertools.product(*per_dim):
        lengths = tuple(r[1] for r in combo)
        if all(n > 0 for n in lengths):
            boxes.append(Box(tuple(r[0] for r in combo), lengths, tuple(r[2] for r in combo)))
    return local_shape, boxes


def intersect(a_offsets, a_lengths, b_offsets, b_lengths) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The common block of two boxes as ``(offsets, lengths)``, or ``None`` when they do not meet."""
    starts, lengths = [], []
    for ao, an, bo, bn in zip(a_offsets, a_lengths, b_offsets, b_lengths):
        start, stop = max(ao, bo), min(ao + an, bo + bn)
        if stop <= start:
            return None
        starts.append(start)
        lengths.append(stop - start)
    return tuple(starts), tuple(lengths)
