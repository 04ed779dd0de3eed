"""DTensor: a local shard plus the mesh, placements and global shape that give it meaning.

Unlike ``torch.distributed.tensor.DTensor`` this is a plain object, not a tensor subclass (a subclass cannot be
framework-neutral): arithmetic happens on ``to_local()`` tensors, and layouts change only through
:meth:`DTensor.redistribute`. Gradients flow through ``from_local``, ``redistribute``, ``full_tensor`` and
``to_local`` with the placements' meaning.

>>> d = distribute_tensor(x, mesh, [Shard(0)])          # doctest: +SKIP
>>> d.redistribute(mesh, [Replicate()]).to_local()      # the full tensor on every rank  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor._redistribute import (
    check_placements_fit,
    grad_placements_of,
    local_shape,
    redistribute,
    redistribute_local,
)
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.placement import Placement, Replicate

__all__ = ["DTensor", "distribute_tensor"]


def normalize_placements(placements: Sequence[Placement], mesh: DeviceMesh, ndim: int) -> tuple[Placement, ...]:
    """Check ``placements`` against ``mesh`` and a tensor of ``ndim`` dims; make (Strided)Shard dims non-negative.

    Raises:
        ValueError: wrong length, Shard dim out of range, or one tensor dim sharded on two mesh axes.
        TypeError: an entry that is not a Placement.
    """
    placements = tuple(placements)
    if len(placements) != mesh.ndim:
        raise ValueError(f"placements must have one entry per mesh axis ({mesh.ndim}), got {len(placements)}: "
                         f"{list(placements)}")
    out = []
    for p in placements:
        if not isinstance(p, Placement):
            raise TypeError(f"placements must be Placement objects (Shard, StridedShard, Replicate, Partial), got "
                            f"{p!r}")
        if p.is_shard_like():
            if not -ndim <= p.dim < ndim:
                raise ValueError(f"{p} is out of range for a {ndim}-D tensor; valid dims: [{-ndim}, {ndim})")
            p = dataclasses.replace(p, dim=p.dim % ndim)
        out.append(p)
    dims = [p.dim for p in out if p.is_shard_like()]
    if len(dims) != len(set(dims)):
        raise ValueError(f"each tensor dim may be sharded on one mesh axis only, got {out}")
    return tuple(out)


class DTensor:
    """A distributed tensor: this rank's ``local`` shard + ``device_mesh`` + ``placements`` + global ``shape``.

    Create one with :meth:`from_local` or :func:`distribute_tensor`.
    """

    def __init__(self, local, device_mesh: DeviceMesh, placements: tuple[Placement, ...], shape: tuple[int, ...]):
        self._local, self.device_mesh, self.placements, self.shape = local, device_mesh, placements, shape

    @classmethod
    def from_local(cls, local, device_mesh: DeviceMesh, placements: Sequence[Placement], *,
                   shape: Sequence[int] | None = None) -> DTensor:
        """Wrap this rank's shard. No communication.

        Args:
            shape: the global shape; needed for uneven shards. Without it, every Shard (and StridedShard) dim is
                taken to be even (local size times the axis size), as torch does.

        Raises:
            ValueError: bad placements (see ``normalize_placements``), a ``StridedShard`` that does not divide its
                dim, or a local shape that is not this rank's shard of ``shape``.
        """
        placements = normalize_placements(placements, device_mesh, len(local.shape))
        if shape is None:
            shape = list(local.shape)
            for axis, p in enumerate(placements):
                if p.is_shard_like():
                    shape[p.dim] *= device_mesh.size(axis)
        shape = tuple(int(s) for s in shape)
        expected = local_shape(shape, device_mesh, placements)
        if tuple(local.shape) != expected:
            raise ValueError(f"local shard shape {list(local.shape)} does not match global shape {list(shape)} "
                             f"under {list(placements)}: expected {list(expected)} on this rank")
        return cls(local, device_mesh, placements, shape)

    def to_local(self, grad_placements: Sequence[Placement] | None = None):
        """This rank's shard. ``grad_placements`` says how the gradient of the returned tensor is laid out, e.g.
        ``[Partial()]`` when each rank's gradient is partial: it is then reduced to this DTensor's layout in
        backward (an all-reduce for Replicate)."""
        if grad_placements is None:
            return self._local
        src = normalize_placements(grad_placements, self.device_mesh, len(self.shape))
        dst = grad_placements_of(self.placements)
        if src == dst:
            return self._local
        mesh, shape = self.device_mesh, self.shape
        return get_platform().autograd_function(
            lambda t: t, lambda g: redistribute_local(g, mesh, src, dst, shape))(self._local)

    def redistribute(self, device_mesh: DeviceMesh | None = None,
                     placements: Sequence[Placement] | None = None) -> DTensor:
        """The same global tensor under ``placements`` (see the transition table in ``_redistribute``)."""
        mesh = device_mesh or self.device_mesh
        if mesh != self.device_mesh:
            raise ValueError(f"redistribute across meshes is not supported: {self.device_mesh} -> {mesh}")
        placements = normalize_placements(placements if placements is not None else self.placements, mesh,
                                          len(self.shape))
        check_placements_fit(self.shape, mesh, placements)
        local = redistribute(self._local, mesh, self.placements, placements, self.shape)
        return DTensor(local, mesh, placements, self.shape)

    def full_tensor(self):
        """The whole tensor on every rank (differentiable)."""
        return self.redistribute(placements=[Replicate()] * self.device_mesh.ndim).to_local()

    @property
    def dtype(self):
        return self._local.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return (f"DTensor(shape={list(self.shape)}, placements={list(self.placements)}, "
                f"local_shape={list(self._local.shape)}, mesh={self.device_mesh})")


def distribute_tensor(tensor, device_mesh: DeviceMesh, placements: Sequence[Placement], *,
                      src_data_rank: int | None = 0) -> DTensor:
    """Lay out a full ``tensor`` over ``device_mesh``. Every rank of the world calls it.

    Args:
        src_data_rank: as in torch, the group rank, on every mesh axis, whose ``tensor`` is the truth: it is
            broadcast along each axis in turn (so with the default 0, from the mesh's first rank; this also holds
            for a sub-mesh such as ``mesh["ep"]``, whose first rank differs between ranks). ``None`` uses each
            rank's own ``tensor`` without communication (they must agree).

    Partial placements put the value on the first rank of the axis and zeros on the others.

    Raises:
        ValueError: ``src_data_rank`` is not a group rank of every mesh axis, or a ``StridedShard`` does not divide
            its dim (checked before any communication).
    """
    p = get_platform()
    placements = normalize_placements(placements, device_mesh, len(tensor.shape))
    check_placements_fit(tuple(tensor.shape), device_mesh, placements)
    if src_data_rank is not None:
        if not 0 <= src_data_rank < min(device_mesh.shape):
            raise ValueError(f"src_data_rank must be a group rank of every mesh axis, in [0, "
                             f"{min(device_mesh.shape)}) for mesh shape {list(device_mesh.shape)}; got {src_data_rank}")
        # along existing axis groups only: a group over the whole (sub-)mesh would have to be created by every
        # rank of the world, which ranks of other sub-meshes never do
        for axis in range(device_mesh.ndim):
            group = device_mesh.get_group(axis)
            tensor = p.broadcast(tensor, src=group.ranks[src_data_rank], group=group)
    shape = tuple(tensor.shape)
    start = tuple(Replicate() for _ in placements)
    target = tuple(Replicate() if q.is_partial() else q for q in placements)
    local = redistribute_local(tensor, device_mesh, start, target, shape)
    for axis, q in enumerate(placements):
        if q.is_partial() and device_mesh.get_local_rank(axis) != 0:
            local = local * 0
    return DTensor(local, device_mesh, placements, shape)
