"""Sharded parameters in a torch ``state_dict`` as ``torch.distributed.tensor.DTensor`` values.

A sharded parameter is a plain ``nn.Parameter`` holding this rank's LOCAL shard (see
:mod:`hyper_parallel.dtensor.module`). Left as it is in ``model.state_dict()``, ``torch.distributed.checkpoint``
(DCP) takes every plain tensor for a REPLICATED one: it saves one rank's copy and restores it on every rank, so half
the expert shards come back from the wrong rank without any error (issue 11). The hooks registered here make
``state_dict`` tell the truth:

* ``model.state_dict()`` returns, for every parameter with a recorded layout, a torch ``DTensor`` built on the
  parameter's local shard (no copy: its local tensor is ``param.detach()``, the parameter's own storage) with the
  layout's mesh, placements and global shape. DCP then saves each shard once with its global offset, and
  ``dcp.load(sd)`` writes each rank's shard straight into the parameters (and reshards: a checkpoint saved at
  ``ep=4`` loads at ``ep=2``).
* ``model.load_state_dict(sd)`` accepts those DTensors (after checking that their layout is this model's: it copies
  local shards, it does not reshard) as well as plain local shards, as before.

A parameter laid out with ``StridedShard`` has no such DTensor: DCP describes each rank's shard as ONE block at one
global offset, and a strided shard is ``split_factor`` blocks (torch's ``_StridedShard`` gets the first block's
offset, so DCP would fail on overlapping chunks or write rows to the wrong places). ``state_dict`` raises a
``ValueError`` for it rather than return a checkpoint that is silently wrong.

The torch meshes are made from the process groups our :class:`~hyper_parallel.dtensor.device_mesh.DeviceMesh`
already has (``DeviceMesh.from_group``; no group is created), once per mesh and process.

>>> sd = model.state_dict()                                           # doctest: +SKIP
>>> torch.distributed.checkpoint.save(sd, checkpoint_id=path)         # every rank  # doctest: +SKIP
>>> torch.distributed.checkpoint.load(sd, checkpoint_id=path)         # loads into model's parameters  # doctest: +SKIP

The torch adapter registers the hooks (:meth:`~platform_adapters.torch.TorchPlatform.register_sharded_state_dict`)
whenever :func:`~hyper_parallel.dtensor.module.distribute_parameter` records a layout; nothing else imports this
module.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh as TorchDeviceMesh
from torch.distributed.tensor import DTensor as TorchDTensor
from torch.distributed.tensor import Partial as TorchPartial
from torch.distributed.tensor import Replicate as TorchReplicate
from torch.distributed.tensor import Shard as TorchShard

try:  # private in torch; only StridedShard layouts need it
    from torch.distributed.tensor.placement_types import _StridedShard as TorchStridedShard
except ImportError:  # pragma: no cover - a torch without it
    TorchStridedShard = None

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.module import ParameterSpec, module_parameter_spec
from hyper_parallel.dtensor.placement import Partial, Replicate, Shard, StridedShard, chunk_sizes

__all__ = ["check_dcp_expressible", "local_shape", "register_state_dict_hooks", "to_torch_dtensor", "torch_device_mesh",
           "torch_placements"]

_HOOKS_ATTR = "_hyper_parallel_dcp_hooks"
# (device type, ranks, shape, axis names, our Group of each axis) -> torch mesh. Our Groups compare by identity, so
# a world torn down and joined again (new Groups) never gets a torch mesh over destroyed process groups.
_TORCH_MESHES: dict[tuple, TorchDeviceMesh] = {}


def forget_torch_meshes() -> None:
    """Drop the cached torch meshes (the platform calls it when it leaves a world: they hold its process groups)."""
    _TORCH_MESHES.clear()


def register_state_dict_hooks(module: torch.nn.Module) -> None:
    """Make ``module.state_dict()`` return its sharded parameters as torch DTensors and ``load_state_dict`` accept
    them. Idempotent: a module gets the two hooks once, however many of its parameters are distributed.

    The hooks are module-level functions (no closure), so the module still pickles, deep-copies and
    ``torch.save``-s; a copy carries its hooks and reads the layouts its own modules record.
    """
    if module.__dict__.get(_HOOKS_ATTR, False):
        return
    module.register_state_dict_post_hook(_state_dict_post_hook)
    module.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    object.__setattr__(module, _HOOKS_ATTR, True)  # a plain attribute: it travels with the module's hooks


def torch_device_mesh(mesh: DeviceMesh, device_type: str) -> TorchDeviceMesh:
    """The torch ``DeviceMesh`` of ``mesh`` on its existing process groups, for tensors on ``device_type``.

    Cached per mesh and process; creates no process group.

    Raises:
        ValueError: this rank is not in ``mesh``, or an axis's torch group orders its ranks differently from the
            mesh (torch sorts a group's ranks; a mesh line in another order would shard by a different order).
    """
    groups = tuple(mesh.get_group(axis) for axis in range(mesh.ndim))  # raises if this rank is not in the mesh
    for group in groups:
        get_platform()._group(group, "exposing a device mesh to torch")  # refuses a group of a world left since
    key = (device_type, mesh.ranks, mesh.shape, mesh.mesh_dim_names, groups)
    cached = _TORCH_MESHES.get(key)
    if cached is not None:
        return cached
    for axis, group in enumerate(groups):
        torch_ranks = dist.get_process_group_ranks(group.native)
        if list(torch_ranks) != list(group.ranks):
            raise ValueError(
                f"cannot expose {mesh} to torch: axis {axis}'s line has ranks {list(group.ranks)} in this order, but "
                f"torch's process group orders them {torch_ranks}; build the mesh with ascending ranks along every "
                "axis (init_device_mesh does)")
    names = tuple(mesh.mesh_dim_names or (f"dim{axis}" for axis in range(mesh.ndim)))
    ranks = torch.tensor(mesh.ranks, dtype=torch.int).reshape(mesh.shape)
    # The list form (even for one axis) takes the rank layout as given; the 1-D form would rebuild it from the group.
    torch_mesh = TorchDeviceMesh.from_group([g.native for g in groups], device_type, mesh=ranks,
                                            mesh_dim_names=names)
    _TORCH_MESHES[key] = torch_mesh
    return torch_mesh


def torch_placements(placements, ndim: int) -> tuple:
    """Our placements as torch's (same meaning: ``Shard`` splits as ``torch.chunk`` does in both; ``StridedShard``
    is torch's ``_StridedShard`` with the same ``split_factor``, which DCP cannot save: see :func:`to_torch_dtensor`).

    Args:
        placements: one of ours per mesh axis.
        ndim: the tensor's rank, to normalise a negative ``Shard`` dim.
    """
    out = []
    for pl in placements:
        if isinstance(pl, Shard):
            out.append(TorchShard(pl.dim % ndim if ndim else pl.dim))
        elif isinstance(pl, StridedShard):
            if TorchStridedShard is None:
                raise TypeError(f"no torch placement for {pl!r}: this torch ({torch.__version__}) has no "
                                "torch.distributed.tensor.placement_types._StridedShard")
            out.append(TorchStridedShard(pl.dim % ndim if ndim else pl.dim, split_factor=pl.split_factor))
        elif isinstance(pl, Replicate):
            out.append(TorchReplicate())
        elif isinstance(pl, Partial):
            out.append(TorchPartial(pl.reduce_op))
        else:
            raise TypeError(f"no torch placement for {pl!r}; expected Shard, StridedShard, Replicate or Partial")
    return tuple(out)


def local_shape(spec: ParameterSpec) -> tuple[int, ...]:
    """The shape of this rank's shard under ``spec`` (``torch.chunk`` sizes along each sharded dim)."""
    shape = list(spec.shape)
    for axis, pl in enumerate(spec.placements):
        if isinstance(pl, Shard):
            dim = pl.dim % len(shape)
            shape[dim] = chunk_sizes(shape[dim], spec.device_mesh.size(axis))[spec.device_mesh.get_local_rank(axis)]
        elif isinstance(pl, StridedShard):  # even by construction (the dim is divisible by split_factor * n)
            dim = pl.dim % len(shape)
            shape[dim] //= spec.device_mesh.size(axis)
    return tuple(shape)


def check_dcp_expressible(spec: ParameterSpec) -> None:
    """Refuse a layout that a torch DTensor in a DCP checkpoint cannot describe truthfully.

    Raises:
        ValueError: the layout has a ``StridedShard`` (DCP records one contiguous block per shard).
    """
    strided = [(axis, pl) for axis, pl in enumerate(spec.placements) if isinstance(pl, StridedShard)]
    if not strided:
        return
    names = spec.device_mesh.mesh_dim_names or tuple(str(a) for a in range(spec.device_mesh.ndim))
    where = ", ".join(f"{pl} on mesh axis {names[axis]!r}" for axis, pl in strided)
    raise ValueError(
        f"torch.distributed.checkpoint cannot express this layout ({where}; {_describe_spec(spec)}): DCP records each "
        "rank's shard as one contiguous block at one global offset, and a StridedShard shard is split_factor "
        "blocks, so a checkpoint would fail or put rows in the wrong places. No state dict is returned rather than "
        "a wrong checkpoint. Supported in state_dict: Shard, Replicate and Partial. To checkpoint this parameter, "
        "lay it out with Shard(dim) (or save full_parameter(param))")


def to_torch_dtensor(local: torch.Tensor, spec: ParameterSpec) -> TorchDTensor:
    """A torch DTensor on ``local`` (no copy, no communication) laid out as ``spec`` says.

    Raises:
        ValueError: ``local`` does not have the shape ``spec`` gives this rank's shard, or the layout has a
            ``StridedShard`` (see :func:`check_dcp_expressible`).
    """
    check_dcp_expressible(spec)
    want = local_shape(spec)
    if tuple(local.shape) != want:
        raise ValueError(
            f"a tensor of shape {list(local.shape)} cannot be this rank's shard of a parameter laid out as "
            f"{_describe_spec(spec)}: that layout gives rank {dist.get_rank()} a shard of shape {list(want)}. Was "
            "the parameter replaced after it was distributed? Distribute the new one (distribute_parameter)")
    mesh = torch_device_mesh(spec.device_mesh, local.device.type)
    shape = tuple(spec.shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))  # the full tensor, contiguous
    return TorchDTensor.from_local(local, mesh, torch_placements(spec.placements, len(shape)), run_check=False,
                                   shape=torch.Size(shape), stride=stride)


def _state_dict_post_hook(module, state_dict, prefix, local_metadata) -> None:
    for name, _ in module.named_parameters(recurse=False):
        spec = module_parameter_spec(module, name)
        value = state_dict.get(prefix + name)
        # Only this module's sharded parameters, and only once (another hook may already have converted them).
        if spec is None or not isinstance(value, torch.Tensor) or isinstance(value, TorchDTensor):
            continue
        try:
            state_dict[prefix + name] = to_torch_dtensor(value, spec)
        except ValueError as e:
            raise ValueError(f"state_dict: {prefix + name}: {e}") from None


def _load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    # torch hands this hook the dict that this module's parameters are then copied from: replacing a DTensor by its
    # local shard here makes the ordinary copy (with its shape check) load it. A plain tensor is left to that copy:
    # a local shard loads as before.
    for name, _ in module.named_parameters(recurse=False):
        spec = module_parameter_spec(module, name)
        value = state_dict.get(prefix + name)
        if spec is None or not isinstance(value, TorchDTensor):
            continue
        _check_same_layout(prefix + name, value, spec)
        state_dict[prefix + name] = value.to_local()


def _check_same_layout(key: str, value: TorchDTensor, spec: ParameterSpec) -> None:
    mesh = spec.device_mesh
    ranks = value.device_mesh.mesh.flatten().tolist()
    got = (tuple(ranks), tuple(value.device_mesh.mesh.shape), tuple(value.placements), tuple(value.shape))
    want = (mesh.ranks, mesh.shape, torch_placements(spec.placements, len(spec.shape)), tuple(spec.shape))
    if got != want:
        raise ValueError(
            f"load_state_dict: {key} is a DTensor laid out as mesh ranks {list(got[0])} of shape {list(got[1])}, "
            f"placements {list(got[2])}, global shape {list(got[3])}; this model's {key} is laid out as "
            f"{_describe_spec(spec)}. load_state_dict copies local shards and cannot reshard: load the checkpoint "
            "with torch.distributed.checkpoint.load (which reshards), or parallelize the model the same way")


def _describe_spec(spec: ParameterSpec) -> str:
    return (f"mesh ranks {list(spec.device_mesh.ranks)} of shape {list(spec.device_mesh.shape)}, placements "
            f"{list(spec.placements)}, global shape {list(spec.shape)}")
