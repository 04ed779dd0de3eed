"""DeviceMesh: an n-D grid of ranks with named axes, and the process group of each axis.

Every rank creates every group of an axis in the same order (the contract's ``new_group`` rule), then keeps the one
it belongs to; the platform creates each group once per process, so slicing a mesh (``mesh["ep"]``,
``mesh["ep", "tp"]``) or building it again reuses the groups. A mesh pickles as its layout and, when loaded, finds
the same groups in the loading process.

>>> mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))   # doctest: +SKIP
>>> mesh["tp"].size(), mesh.get_local_rank("ep"), mesh.get_coordinate()  # doctest: +SKIP
(2, 0, [0, 1])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.platform import Group

__all__ = ["DeviceMesh", "init_device_mesh"]



class DeviceMesh:
    """Ranks laid out on an n-D grid with optional axis names.

    Args:
        device_type: the device kind of the tensors (``"cpu"``, ``"cuda"``, ``"npu"``...); informative.
        mesh: nested lists of global ranks (any n-D rectangular shape), or a flat list with ``shape``.
        mesh_dim_names: one name per axis (optional; needed for ``mesh["name"]``).

    Every rank of the world must construct the same meshes in the same order.
    """

    def __init__(self, device_type: str, mesh, mesh_dim_names: Sequence[str] | None = None, *,
                 _shape: Sequence[int] | None = None, _existing_groups: bool = False):
        self.device_type = device_type
        if _shape is None:
            ranks, shape = _flatten(mesh)
        else:
            ranks, shape = tuple(int(r) for r in mesh), tuple(_shape)
        self._ranks, self._shape = ranks, shape
        if mesh_dim_names is not None:
            mesh_dim_names = tuple(mesh_dim_names)
            if len(mesh_dim_names) != len(shape) or len(set(mesh_dim_names)) != len(shape):
                raise ValueError(f"mesh_dim_names must be {len(shape)} distinct names (one per axis of shape "
                                 f"{list(shape)}), got {list(mesh_dim_names)}")
        self.mesh_dim_names = mesh_dim_names
        platform = get_platform()
        self._my_rank = platform.get_rank()
        world = platform.get_world_size()
        if sorted(ranks) != sorted(set(ranks)) or any(not 0 <= r < world for r in ranks):
            raise ValueError(f"mesh ranks must be distinct ranks of the world [0, {world}), got {list(ranks)}")
        self._groups: list[Group | None] = [self._create_axis_groups(axis, _existing_groups)
                                            for axis in range(len(shape))]

    # ---------------------------------------------------------------- geometry
    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def size(self, axis: int | str | None = None) -> int:
        """Number of ranks in the mesh, or along one axis."""
        return len(self._ranks) if axis is None else self._shape[self._axis(axis)]

    @property
    def ranks(self) -> tuple[int, ...]:
        """Global ranks in row-major order."""
        return self._ranks

    def get_coordinate(self) -> list[int] | None:
        """This rank's coordinate on the mesh, or ``None`` if it is not in the mesh."""
        if self._my_rank not in self._ranks:
            return None
        return list(_unravel(self._ranks.index(self._my_rank), self._shape))

    def get_local_rank(self, axis: int | str | None = None) -> int:
        """This rank's index along ``axis`` (may be omitted on a 1-D mesh)."""
        if axis is None:
            if self.ndim != 1:
                raise ValueError(f"get_local_rank() needs an axis on a {self.ndim}-D mesh; axes: {self._axis_names()}")
            axis = 0
        coord = self.get_coordinate()
        if coord is None:
            raise ValueError(f"rank {self._my_rank} is not in this mesh (ranks {list(self._ranks)})")
        return coord[self._axis(axis)]

    def get_group(self, axis: int | str | None = None) -> Group:
        """The process group of this rank's line along ``axis`` (may be omitted on a 1-D mesh)."""
        if axis is None:
            if self.ndim != 1:
                raise ValueError(f"get_group() needs an axis on a {self.ndim}-D mesh; axes: {self._axis_names()}")
            axis = 0
        group = self._groups[self._axis(axis)]
        if group is None:
            raise ValueError(f"rank {self._my_rank} is not in this mesh (ranks {list(self._ranks)})")
        return group

    def __getitem__(self, names) -> DeviceMesh:
        """The sub-mesh through this rank over the named axes, in the order given."""
        names = (names,) if isinstance(names, str) else tuple(names)
        axes = [self._axis(n) for n in names]
        if len(set(axes)) != len(axes):
            raise ValueError(f"mesh axes must be distinct, got {list(names)}")
        coord = self.get_coordinate()
        if coord is None:
            raise ValueError(f"rank {self._my_rank} is not in this mesh (ranks {list(self._ranks)})")
        sub_shape = tuple(self._shape[a] for a in axes)
        ranks = []
        for sub in itertools.product(*(range(s) for s in sub_shape)):
            c = list(coord)
            for a, i in zip(axes, sub):
                c[a] = i
            ranks.append(self._ranks[_ravel(c, self._shape)])
        return DeviceMesh(self.device_type, ranks, [self._axis_names()[a] for a in axes], _shape=sub_shape)

    def __repr__(self) -> str:
        names = f", mesh_dim_names={self.mesh_dim_names}" if self.mesh_dim_names else ""
        return f"DeviceMesh({self.device_type!r}, shape={list(self._shape)}, ranks={list(self._ranks)}{names})"

    def __eq__(self, other) -> bool:
        return isinstance(other, DeviceMesh) and (self._ranks, self._shape) == (other._ranks, other._shape)

    def __hash__(self) -> int:
        return hash((self._ranks, self._shape))

    def __reduce__(self):
        # A mesh pickles as its layout; loading rebuilds it on this process's existing groups (no collective, so a
        # single rank may load), and fails clearly when they do not exist.
        return _restore_mesh, (self.device_type, self._ranks, self._shape, self.mesh_dim_names)

    # ---------------------------------------------------------------- internals
    def _axis_names(self) -> list[str]:
        return list(self.mesh_dim_names) if self.mesh_dim_names else [str(i) for i in range(self.ndim)]

    def _axis(self, axis: int | str) -> int:
        if isinstance(axis, str):
            if not self.mesh_dim_names:
                raise ValueError(f"mesh has no axis named {axis!r}: its axes have no names (create the mesh with "
                                 "mesh_dim_names=...)")
            if axis not in self.mesh_dim_names:
                raise ValueError(f"mesh has no axis named {axis!r}; its axes are {self._axis_names()}")
            return self.mesh_dim_names.index(axis)
        if isinstance(axis, bool) or not isinstance(axis, int) or not -self.ndim <= axis < self.ndim:
            raise ValueError(f"mesh axis must be a name or an int in [0, {self.ndim}), got {axis!r}; "
                             f"axes: {self._axis_names()}")
        return axis % self.ndim

    def _create_axis_groups(self, axis: int, existing: bool = False) -> Group | None:
        """Create every line of ``axis`` (all ranks, same order) and return the one holding this rank; with
        ``existing``, only look this rank's line up among the groups this process has."""
        platform = get_platform()
        mine = None
        others = [range(s) for i, s in enumerate(self._shape) if i != axis]
        for rest in itertools.product(*others):
            line = []
            for i in range(self._shape[axis]):
                coord = list(rest)
                coord.insert(axis, i)
                line.append(self._ranks[_ravel(coord, self._shape)])
            if existing:
                if self._my_rank in line:
                    mine = platform._existing_group(tuple(line))
                continue
            group = platform.new_group(line)
            if self._my_rank in line:
                mine = group
        return mine


def _restore_mesh(device_type: str, ranks, shape, mesh_dim_names) -> DeviceMesh:
    return DeviceMesh(device_type, ranks, mesh_dim_names, _shape=shape, _existing_groups=True)


def init_device_mesh(device_type: str, mesh_shape: Sequence[int], *,
                     mesh_dim_names: Sequence[str] | None = None) -> DeviceMesh:
    """A mesh of ``mesh_shape`` over the whole world, ranks in row-major order. Every rank must call it.

    Raises:
        ValueError: if the product of ``mesh_shape`` is not the world size.
    """
    platform = get_platform()
    world = platform.get_world_size()
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if not mesh_shape or any(s < 1 for s in mesh_shape) or math.prod(mesh_shape) != world:
        raise ValueError(f"mesh_shape {list(mesh_shape)} must be positive sizes whose product equals the world "
                         f"size ({world}); got product {math.prod(mesh_shape)}")
    return DeviceMesh(device_type, list(range(world)), mesh_dim_names, _shape=mesh_shape)


def _flatten(mesh) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(mesh, (list, tuple)):
        if hasattr(mesh, "tolist"):
            mesh = mesh.tolist()
        else:
            raise TypeError(f"mesh must be nested lists of ranks, got {type(mesh).__name__}")
    shape, level = [], mesh
    while isinstance(level, (list, tuple)):
        shape.append(len(level))
        level = level[0] if level else None
    flat = list(mesh)
    for _ in range(len(shape) - 1):
        if any(not isinstance(row, (list, tuple)) or len(row) != len(flat[0]) for row in flat):
            raise ValueError(f"mesh must be rectangular, got {mesh}")
        flat = [r for row in flat for r in row]
    return tuple(int(r) for r in flat), tuple(shape)


def _ravel(coord: Sequence[int], shape: Sequence[int]) -> int:
    index = 0
    for c, s in zip(coord, shape):
        index = index * s + c
    return index


def _unravel(index: int, shape: Sequence[int]) -> tuple[int, ...]:
    coord = []
    for s in reversed(shape):
        index, c = divmod(index, s)
        coord.append(c)
    return tuple(reversed(coord))
