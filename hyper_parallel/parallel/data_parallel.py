"""Data parallelism as a style: every gradient reduced over exactly the data axes on which its parameter is
replicated, and scaled so that it equals the gradient of the mean loss over the whole global batch.

The contract is DDP's: each rank's loss is the mean over its own tokens, and after backward every gradient (each
rank's local shard) equals what one device computes for the mean loss over all ranks' tokens. For each parameter and
each data axis ``a`` (of size ``n``) of the mesh:

* replicated along ``a`` (a dense layer, a router, shared experts; or laid out on a mesh without ``a``): its
  gradient is summed over ``a`` and divided by ``n``;
* an expert shard along ``a`` (``Shard(expert_dim)`` from an expert style): divided by ``n`` only, as the token
  exchange already brought it every rank's rows;
* split any other way along ``a`` (tensor parallelism): refused, as the ranks of a tensor-parallel axis hold the
  same data.

Axes that are not data axes (``tp``) are left alone. The reductions go in buckets: one flat all-reduce per bucket
of parameters that share their reduction (the same axes, scale and dtype), not one per parameter.

On torch ``DataParallel().apply(model, mesh)`` installs the reduction in backward (buckets are all-reduced as their
gradients become ready, asynchronously, and waited for when backward ends), so ``loss.backward(); opt.step()`` just
works. Frameworks whose gradients are returned, not stored on the parameters (MindSpore's ``value_and_grad``), call
:func:`reduce_gradients` on them, as MindSpore's ``DistributedGradReducer`` is used.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.module import _DATA_PARALLEL_ATTR, named_parameter_specs
from hyper_parallel.parallel.style import ParallelStyle
from hyper_parallel.platform import _ITEMSIZE, Group

__all__ = ["DataParallel", "GradientReducer", "Bucket", "reduce_gradients", "gradient_reducer_of"]

_REDUCER_ATTR = "_hyper_parallel_gradient_reducer"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bucket:
    """Parameters whose gradients are reduced together: one flat all-reduce over :attr:`group` (none when
    ``None``), then a multiplication by :attr:`scale`."""

    indices: tuple[int, ...]
    """Positions in :attr:`GradientReducer.params`."""
    axes: tuple[str, ...]
    """The data axes the gradients are summed over."""
    group: Group | None
    """The process group over those axes (``None``: nothing to sum)."""
    scale: float
    """``1 / (product of the data axes' sizes)``."""
    numel: int
    """Elements of the flat buffer."""


class GradientReducer:
    """The reduction plan of one model: :attr:`params` (trainable, in ``named_parameters`` order), their
    :attr:`names`, and :attr:`buckets` in the order their all-reduces are issued (the reverse of the parameters'
    order, which is roughly the order backward produces their gradients)."""

    def __init__(self, params: list, names: list[str], buckets: list[Bucket], model=None):
        self.params, self.names, self.buckets = params, names, buckets
        self._model = model  # to find parameters replaced since (Platform.replace_parameter) by their names

    def reduce(self, grads: Sequence, params: Sequence | None = None) -> tuple:
        """The reduced gradients (``None`` counts as zeros) of :attr:`params`, or of ``params`` (the same
        parameters in another order, e.g. ``model.trainable_params()``), in the order given."""
        p = get_platform()
        if params is not None:
            position = {id(q): i for i, q in enumerate(self.params)}
            if self._model is not None and any(id(q) not in position for q in params):
                index = {name: i for i, name in enumerate(self.names)}
                position = {id(q): index[name] for name, q, _ in named_parameter_specs(self._model) if name in index}
            order = [position.get(id(q)) for q in params]
            if len(order) != len(self.params) or None in order or sorted(order) != list(range(len(order))):
                raise ValueError("reduce_gradients: params must be the model's trainable parameters, each once (got "
                                 f"{len(params)} for {len(self.params)}, or parameters of another model)")
            mine = [None] * len(order)
            for k, i in enumerate(order):
                mine[i] = grads[k]
            reduced = self.reduce(mine)
            return tuple(reduced[i] for i in order)
        if len(grads) != len(self.params):
            raise ValueError(f"reduce_gradients: got {len(grads)} gradients for {len(self.params)} trainable "
                             "parameters (pass the gradients of every trainable parameter, in named_parameters "
                             "order, as mindspore.value_and_grad(..., weights=model.trainable_params()) returns them)")
        out = list(grads)
        for bucket in self.buckets:
            pieces = [self._grad_or_zeros(grads[i], i) for i in bucket.indices]
            if bucket.group is None:
                for i, g in zip(bucket.indices, pieces):
                    out[i] = g * bucket.scale
                continue
            flat = p.cat([g.reshape(-1) for g in pieces]) if len(pieces) > 1 else pieces[0].reshape(-1)
            flat = p.all_reduce(flat, group=bucket.group) * bucket.scale
            start = 0
            for i, g in zip(bucket.indices, pieces):
                n = _numel(g)
                out[i] = flat[start:start + n].reshape(tuple(g.shape))
                start += n
        return tuple(out)

    def _grad_or_zeros(self, g, i: int):
        if g is not None:
            return g
        q = self.params[i]
        return get_platform().zeros(tuple(q.shape), dtype=get_platform().dtype_name(q.dtype),
                                    device=getattr(q, "device", None))


def gradient_reducer_of(model) -> GradientReducer | None:
    """The :class:`GradientReducer` :class:`DataParallel` installed on ``model``, or ``None``."""
    return getattr(model, _REDUCER_ATTR, None)


def reduce_gradients(model, grads: Sequence, params: Sequence | None = None) -> tuple:
    """Reduce the gradients of ``model``'s trainable parameters as :class:`DataParallel` prescribes: the explicit
    call for frameworks whose gradients are returned (MindSpore). ``grads`` follow ``params`` (default: the
    trainable parameters in ``named_parameters`` order, :attr:`GradientReducer.params`).

    >>> grads = mindspore.value_and_grad(loss_fn, None, params)(x)[1]     # doctest: +SKIP
    >>> grads = reduce_gradients(model, grads, params)                   # doctest: +SKIP

    Raises:
        ValueError: ``DataParallel`` was not applied to ``model``, or ``grads`` has the wrong length.
    """
    reducer = gradient_reducer_of(model)
    if reducer is None:
        raise ValueError(f"reduce_gradients: DataParallel was not applied to this {type(model).__name__}; call "
                         "DataParallel(data_axes=...).apply(model, mesh) first")
    return reducer.reduce(grads, params)


class DataParallel(ParallelStyle):
    """Data parallelism over the named axes of a mesh, for a whole model whose other parallelism (expert styles,
    tensor-parallel styles) is already applied.

    Args:
        data_axes: the mesh axes whose ranks feed different data (e.g. ``("dp", "ep")``: the ep ranks of an
            expert-parallel layer hold different tokens too). Never a tensor-parallel axis.
        bucket_cap_mb: the most MiB of gradients one all-reduce carries.
        ignored: modules or parameters whose gradients another library reduces (torch FSDP2's ``fully_shard`` on
            the dense parts: see the Training page); their parameters are left out.

    >>> mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))         # doctest: +SKIP
    >>> ExpertParallel().apply(moe.experts, mesh["ep"])                              # doctest: +SKIP
    >>> DataParallel(data_axes=("dp", "ep")).apply(model, mesh)                      # doctest: +SKIP
    """

    def __init__(self, *, data_axes: Sequence[str], bucket_cap_mb: float = 25.0, ignored: Sequence = ()):
        if isinstance(data_axes, str):
            data_axes = (data_axes,)
        data_axes = tuple(data_axes)
        if not data_axes or not all(isinstance(a, str) for a in data_axes) or len(set(data_axes)) != len(data_axes):
            raise ValueError(f"DataParallel: data_axes must be distinct mesh axis names, e.g. ('dp', 'ep'), got "
                             f"{list(data_axes)}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"DataParallel: bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
        self.data_axes, self.bucket_cap_mb = data_axes, float(bucket_cap_mb)
        self.ignored = tuple(ignored)

    def apply(self, module, device_mesh: DeviceMesh):
        p = get_platform()
        if gradient_reducer_of(module) is not None:
            raise ValueError(f"DataParallel: this {type(module).__name__} already has DataParallel applied; apply "
                             "it once per model")
        names = list(device_mesh.mesh_dim_names or ())
        missing = [a for a in self.data_axes if a not in names]
        if missing:
            raise ValueError(f"DataParallel: data axes {missing} are not axes of the mesh, whose axes are "
                             f"{names or 'unnamed'}")
        ignored = set()
        for item in self.ignored:
            if hasattr(item, "shape"):
                ignored.add(id(item))
            else:
                ignored.update(id(q) for _, q in p.named_parameters(item))
        plan = []  # (name, param, axes to sum over, scale)
        for name, param, spec in named_parameter_specs(module):
            if not getattr(param, "requires_grad", True) or id(param) in ignored:
                continue
            axes, scale = self._reduction(module, name, spec, device_mesh)
            plan.append((name, param, axes, scale))
        reducer = GradientReducer([q for _, q, _, _ in plan], [n for n, _, _, _ in plan],
                                  self._buckets(plan, device_mesh), module)
        p.register_gradient_reducer(module, reducer)  # may refuse the model (torch: FSDP2's parameters not ignored)
        object.__setattr__(module, _REDUCER_ATTR, reducer)
        for param in reducer.params:
            setattr(param, _DATA_PARALLEL_ATTR, True)  # a style applied after this one refuses to replace it
        _log.info("DataParallel over %s: %d parameters in %d buckets", list(self.data_axes), len(plan),
                  len(reducer.buckets))
        return module

    def _reduction(self, model, name: str, spec, mesh: DeviceMesh) -> tuple[tuple[str, ...], float]:
        if spec is None:  # a plain parameter: the same on every rank
            return self.data_axes, 1.0 / math.prod(mesh.size(a) for a in self.data_axes)
        own = list(spec.device_mesh.mesh_dim_names or ())
        if not own or not set(own) <= set(mesh.mesh_dim_names or ()):
            raise ValueError(f"DataParallel: {name} is laid out on a mesh with axes {own or 'unnamed'}, which are not "
                             f"axes of the DataParallel mesh {list(mesh.mesh_dim_names or ())}; apply every style on "
                             "the same mesh or its named sub-meshes")
        axes, scale = [], 1.0
        for a in self.data_axes:
            scale /= mesh.size(a)
            if a not in own:
                axes.append(a)  # replicated along a: every rank of a holds the whole parameter
                continue
            placement = spec.placements[own.index(a)]
            if placement.is_replicate():
                axes.append(a)
            elif not _is_expert_shard(model, name, placement):
                raise ValueError(f"DataParallel: axis {a!r} splits {name} as {placement}, which is tensor "
                                 f"parallelism: the ranks of a tensor-parallel axis hold the same data, so {a!r} "
                                 "cannot be a data axis (data axes are those whose ranks feed different tokens; "
                                 f"got data_axes={list(self.data_axes)})")
            # else: an expert shard along a: the exchange brought it every rank's tokens; only the mean remains
        return tuple(axes), scale

    def _buckets(self, plan, mesh: DeviceMesh) -> list[Bucket]:
        p = get_platform()
        cap = self.bucket_cap_mb * 2 ** 20
        groups: dict[tuple[str, ...], Group | None] = {}
        buckets, open_ = [], {}
        for index in reversed(range(len(plan))):
            _, param, axes, scale = plan[index]
            if axes not in groups:
                groups[axes] = _axes_group(mesh, axes)
            key = (axes, scale, p.dtype_name(param.dtype))
            nbytes = _numel(param) * _ITEMSIZE[p.dtype_name(param.dtype)]
            current = open_.get(key)
            if current is None or current[1] + nbytes > cap and current[0]:
                current = open_[key] = [[], 0]
                buckets.append((key, current))
            current[0].append(index)
            current[1] += nbytes
        return [Bucket(indices=tuple(members), axes=key[0], group=groups[key[0]], scale=key[1],
                       numel=sum(_numel(plan[i][1]) for i in members))
                for key, (members, _) in buckets if members]


def _is_expert_shard(model, name: str, placement) -> bool:
    """``placement`` splits parameter ``name`` of ``model`` along its experts' dim under an expert style."""
    from hyper_parallel.expert_parallel.styles import experts_layout_of  # (expert_parallel imports parallel)

    owner_name, _, attr = name.rpartition(".")
    owner = model
    for part in owner_name.split(".") if owner_name else ():
        owner = getattr(owner, part)
    layout = experts_layout_of(owner)
    if layout is None:
        return False
    weight = {w.name: w for w in layout.weights}.get(attr)
    return weight is not None and placement.is_shard(weight.expert_dim)


def _axes_group(mesh: DeviceMesh, axes: tuple[str, ...]) -> Group | None:
    """The group of this rank's ranks along ``axes`` together (one group for several axes; created on every rank
    for every such line, in one order)."""
    if not axes:
        return None
    if len(axes) == 1:
        return mesh.get_group(axes[0])
    p = get_platform()
    names = list(mesh.mesh_dim_names)
    inner = [names.index(a) for a in axes]
    outer = [i for i in range(mesh.ndim) if i not in inner]
    grid = _grid(mesh)
    mine = None
    for rest in itertools.product(*(range(mesh.shape[i]) for i in outer)):
        line = []
        for sub in itertools.product(*(range(mesh.shape[i]) for i in inner)):
            coord = [0] * mesh.ndim
            for i, c in zip(outer, rest):
                coord[i] = c
            for i, c in zip(inner, sub):
                coord[i] = c
            line.append(grid[tuple(coord)])
        group = p.new_group(line)
        if p.get_rank() in line:
            mine = group
    return mine


def _grid(mesh: DeviceMesh) -> dict:
    coords = itertools.product(*(range(s) for s in mesh.shape))
    return dict(zip(coords, mesh.ranks))


def _numel(x) -> int:
    return math.prod(int(d) for d in x.shape)
