"""Sharded module parameters and ``distribute_module``.

A sharded parameter stays a native Parameter holding this rank's LOCAL shard, so optimizers, autograd and
``state_dict`` keep working unchanged. Its layout (mesh, placements, global shape) is recorded on the module that
owns it (the source of truth: it travels with the module through ``copy.deepcopy``, pickle and ``torch.save``,
which drop a parameter's own attributes on both frameworks) and cached on the parameter object.
:func:`named_parameter_specs` reads a model's layouts (and restores the caches after a copy);
:func:`get_parameter_spec` reads one parameter's cache; :func:`full_parameter` rebuilds the full tensor.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.dtensor import DTensor, distribute_tensor
from hyper_parallel.dtensor.placement import Placement, Replicate

__all__ = ["ParameterSpec", "distribute_parameter", "get_parameter_spec", "full_parameter", "distribute_module",
           "named_parameter_specs"]

_SPEC_ATTR = "_hyper_parallel_spec"
_MODULE_SPECS_ATTR = "_hyper_parallel_parameter_specs"
_DISTRIBUTED_ATTR = "_hyper_parallel_distributed"
_DATA_PARALLEL_ATTR = "_hyper_parallel_data_parallel"
"""Set by DataParallel on the parameters it planned: replacing one afterwards would leave it out of the plan."""


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
    if getattr(full, _DATA_PARALLEL_ATTR, False):
        # the new parameter would miss DataParallel's reduction (torch: its hooks; MindSpore: its plan), and its
        # gradient would come out unscaled or summed over ranks holding other experts, with no error
        raise ValueError(f"{type(module).__name__}.{name} is already under DataParallel, which planned its gradient "
                         "as a replicated parameter's; apply the expert and tensor parallel styles first, then "
                         "DataParallel on the whole model")
    dt = distribute_tensor(full, device_mesh, placements, src_data_rank=src_data_rank)
    param = p.replace_parameter(module, name, dt.to_local())
    spec = ParameterSpec(device_mesh=device_mesh, placements=dt.placements, shape=dt.shape)
    specs = dict(getattr(module, _MODULE_SPECS_ATTR, None) or {})
    specs[name] = spec
    object.__setattr__(module, _MODULE_SPECS_ATTR, specs)  # a plain attribute on every framework's module
    setattr(param, _SPEC_ATTR, spec)
    p.register_sharded_state_dict(module)  # checkpoints see the layout, not a plain tensor taken as replicated
    return param


def get_parameter_spec(param) -> ParameterSpec | None:
    """The layout of a parameter made by :func:`distribute_parameter`, else ``None``.

    This reads the parameter's cache. A copy of a model (``copy.deepcopy``, pickle) carries the layouts in its
    modules but not on the parameters: call :func:`named_parameter_specs` on the copy once to restore them.
    """
    return getattr(param, _SPEC_ATTR, None)


def module_parameter_spec(module, name: str) -> ParameterSpec | None:
    """The layout ``module`` records for its own parameter ``name`` (the source of truth), else ``None``."""
    return (getattr(module, _MODULE_SPECS_ATTR, None) or {}).get(name)


def named_parameter_specs(module) -> list[tuple[str, object, ParameterSpec | None]]:
    """``[(qualified_name, parameter, spec or None), ...]`` for every parameter of ``module``, from the layouts
    its modules record; restores each parameter's cache for :func:`get_parameter_spec` (needed after a copy)."""
    p = get_platform()
    out = []
    for prefix, sub in p.named_modules(module):
        specs = getattr(sub, _MODULE_SPECS_ATTR, None) or {}
        for name, param in p.named_parameters(sub):
            if "." in name:
                continue  # a submodule's own: listed under that submodule
            spec = specs.get(name)
            if spec is not None and get_parameter_spec(param) is not spec:
                setattr(param, _SPEC_ATTR, spec)
            out.append((f"{prefix}.{name}" if prefix else name, param, spec))
    return out


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
    # Hooks are partials of module-level functions, not closures, so a distributed module still pickles.
    if input_fn is not None:
        p.register_forward_pre_hook(module, functools.partial(_input_hook, input_fn, device_mesh))
    if output_fn is not None:
        p.register_forward_hook(module, functools.partial(_output_hook, output_fn, device_mesh))
    object.__setattr__(module, _DISTRIBUTED_ATTR, True)
    return module


def _replicate_parameters(module, device_mesh: DeviceMesh) -> None:
    p = get_platform()
    for name, param in list(p.named_parameters(module)):
        if "." not in name and get_parameter_spec(param) is None:
            distribute_parameter(module, name, device_mesh, [Replicate()] * device_mesh.ndim)


def _input_hook(input_fn: Callable, device_mesh: DeviceMesh, module, args):
    inputs = input_fn(module, args, device_mesh)
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _output_hook(output_fn: Callable, device_mesh: DeviceMesh, module, args, output):
    return output_fn(module, output, device_mesh)
