"""Sharded module parameters and ``distribute_module``.

A sharded parameter stays a native Parameter holding this rank's LOCAL shard, so optimizers, autograd and
``state_dict`` keep working unchanged. Its layout (mesh, placements, global shape) is recorded on the parameter
object and can be recovered with :func:`get_parameter_spec`; :func:`full_parameter` rebuilds the full tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.dtensor import DTensor, distribute_tensor
from hyper_parallel.dtensor.placement import Placement, Replicate

__all__ = ["ParameterSpec", "distribute_parameter", "get_parameter_spec", "full_parameter", "distribute_module"]

_SPEC_ATTR = "_hyper_parallel_spec"
_DISTRIBUTED_ATTR = "_hyper_parallel_distributed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParameterSpec:
    """The DTensor layout of a sharded parameter."""

    device_mesh: DeviceMesh
    """The mesh the parameter is laid out on."""
    placements: tuple[Placement, ...]
    """One placement per mesh axis."""
    shape: tuple[int, ...]
    """The global (unsharded) shape."""


def distribute_parameter(module, name: str, device_mesh: DeviceMesh, placements: Sequence[Placement], *,
                         src_data_rank: int | None = 0):
    """Replace ``module.<name>`` by a Parameter holding this rank's shard under ``placements``; return it.

    Raises:
        ValueError: ``module`` has no parameter ``name``.
    """
    p = get_platform()
    full = getattr(module, name, None)
    if not isinstance(full, p.Parameter):
        names = [n for n, _ in p.named_parameters(module) if "." not in n]
        raise ValueError(f"{type(module).__name__} has no parameter {name!r}; its parameters: {names}")
    dt = distribute_tensor(full, device_mesh, placements, src_data_rank=src_data_rank)
    param = p.replace_parameter(module, name, dt.to_local())
    setattr(param, _SPEC_ATTR, ParameterSpec(device_mesh=device_mesh, placements=dt.placements, shape=dt.shape))
    return param


def get_parameter_spec(param) -> ParameterSpec | None:
    """The recorded layout of a parameter made by :func:`distribute_parameter`, else ``None``."""
    return getattr(param, _SPEC_ATTR, None)


def full_parameter(param):
    """The full tensor of a sharded parameter (every rank must call it: it may all-gather).

    Raises:
        ValueError: ``param`` was never distributed.
    """
    spec = get_parameter_spec(param)
    if spec is None:
        raise ValueError("full_parameter: this parameter has no recorded layout (was it distributed?)")
    return DTensor.from_local(param, spec.device_mesh, spec.placements, shape=spec.shape).full_tensor()


def distribute_module(module, device_mesh: DeviceMesh, partition_fn: Callable | None = None,
                      input_fn: Callable | None = None, output_fn: Callable | None = None):
    """Distribute ``module``'s parameters and install input/output transforms, as in torch.

    Args:
        partition_fn: ``partition_fn(name, submodule, device_mesh)`` for every submodule (root is ``""``); it
            shards parameters with :func:`distribute_parameter`. Default: every parameter Replicate (broadcast
            from rank 0).
        input_fn: ``input_fn(module, inputs, device_mesh) -> inputs`` before each forward.
        output_fn: ``output_fn(module, outputs, device_mesh) -> outputs`` after each forward.

    Raises:
        ValueError: the module was already distributed.
    """
    p = get_platform()
    if getattr(module, _DISTRIBUTED_ATTR, False):
        raise ValueError(f"distribute_module: this {type(module).__name__} was already distributed; apply "
                         "distribute_module (or a parallel style) once per module")
    for name, sub in p.named_modules(module):
        if partition_fn is not None:
            partition_fn(name, sub, device_mesh)
        else:
            _replicate_parameters(sub, device_mesh)
    if input_fn is not None:
        p.register_forward_pre_hook(module, lambda mod, args: _as_tuple(input_fn(mod, args, device_mesh)))
    if output_fn is not None:
        p.register_forward_hook(module, lambda mod, args, out: output_fn(mod, out, device_mesh))
    object.__setattr__(module, _DISTRIBUTED_ATTR, True)
    return module


def _replicate_parameters(module, device_mesh: DeviceMesh) -> None:
    p = get_platform()
    for name, param in list(p.named_parameters(module)):
        if "." not in name and get_parameter_spec(param) is None:
            distribute_parameter(module, name, device_mesh, [Replicate()] * device_mesh.ndim)


def _as_tuple(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)
