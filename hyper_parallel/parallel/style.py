"""Parallel styles for dense layers, with torch's names: Colwise / Rowwise linear, input / output preparation.

A style has one method, ``apply(module, device_mesh)``; :func:`~hyper_parallel.parallel.parallelize_module` applies
a plan of them. Module inputs and outputs stay plain local tensors (``use_local_output=True``) unless asked for
DTensors; layouts are stated with one placement on a 1-D mesh, as in torch.

Colwise then Rowwise is Megatron's MLP: one all-reduce in forward (Rowwise output, Partial -> Replicate) and one in
backward (Colwise input: each rank's input gradient is partial, declared by ``to_local(grad_placements=[Partial()])``).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.dtensor import DTensor
from hyper_parallel.dtensor.module import distribute_module, distribute_parameter, module_parameter_spec
from hyper_parallel.dtensor.placement import Partial, Placement, Replicate, Shard

__all__ = ["ParallelStyle", "ColwiseParallel", "RowwiseParallel", "PrepareModuleInput", "PrepareModuleOutput"]


class ParallelStyle(abc.ABC):
    """How to parallelize one module: ``apply(module, device_mesh)`` shards it in place and returns it."""

    @abc.abstractmethod
    def apply(self, module, device_mesh: DeviceMesh):
        """Shard ``module`` over ``device_mesh`` in place; return it."""


def _to_dtensor(x, mesh: DeviceMesh, layout: Placement, shape=None) -> DTensor:
    return x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [layout], shape=shape)


def _linear_weight(module, style: str):
    weight = getattr(module, "weight", None)
    if weight is None or len(weight.shape) != 2:
        raise TypeError(f"{style} applies to linear layers (a 2-D `weight` of shape [out, in], like torch "
                        f"nn.Linear or MindSpore nn.Dense), got {type(module).__name__}")
    return weight


def _check_mesh(mesh: DeviceMesh, style: str) -> None:
    if mesh.ndim != 1:
        raise ValueError(f"{style} needs a 1-D mesh (slice one axis, e.g. mesh['tp']), got {mesh.ndim}-D {mesh}")


class ColwiseParallel(ParallelStyle):
    """Shard a linear layer's output features: weight ``Shard(0)``, bias ``Shard(0)``.

    Args:
        input_layouts: layout of the input (default ``Replicate()``); it is redistributed to Replicate.
        output_layouts: layout of the output (default ``Shard(-1)``: each rank keeps its features).
        use_local_output: return local tensors (default) rather than DTensors.
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        self.input_layouts = input_layouts or Replicate()
        self.output_layouts = output_layouts or Shard(-1)
        self.use_local_output = use_local_output

    def apply(self, module, device_mesh: DeviceMesh):
        _check_mesh(device_mesh, "ColwiseParallel")
        _linear_weight(module, "ColwiseParallel")

        def partition(name, mod, mesh):
            if name == "":
                distribute_parameter(mod, "weight", mesh, [Shard(0)])
                if getattr(mod, "bias", None) is not None:
                    distribute_parameter(mod, "bias", mesh, [Shard(0)])

        return distribute_module(module, device_mesh, partition, self._prepare_input, self._prepare_output)

    def _prepare_input(self, module, inputs, mesh):
        x = _to_dtensor(inputs[0], mesh, self.input_layouts).redistribute(mesh, [Replicate()])
        # every rank computes only its features' share of d(loss)/d(input): the local gradient is Partial.
        return (x.to_local(grad_placements=[Partial()]), *inputs[1:])

    def _prepare_output(self, module, output, mesh):
        shape = (*output.shape[:-1], module_parameter_spec(module, "weight").shape[0])
        out = DTensor.from_local(output, mesh, [Shard(-1)], shape=shape).redistribute(mesh, [self.output_layouts])
        return out.to_local() if self.use_local_output else out


class RowwiseParallel(ParallelStyle):
    """Shard a linear layer's input features: weight ``Shard(1)``, bias ``Replicate()``.

    Args:
        input_layouts: layout of the input (default ``Shard(-1)``, what ColwiseParallel produces).
        output_layouts: layout of the output (default ``Replicate()``: an all-reduce; ``Shard(0)`` gives a
            reduce-scatter for sequence parallelism).
        use_local_output: return local tensors (default) rather than DTensors.
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        self.input_layouts = input_layouts or Shard(-1)
        self.output_layouts = output_layouts or Replicate()
        self.use_local_output = use_local_output

    def apply(self, module, device_mesh: DeviceMesh):
        _check_mesh(device_mesh, "RowwiseParallel")
        _linear_weight(module, "RowwiseParallel")

        def partition(name, mod, mesh):
            if name == "":
                distribute_parameter(mod, "weight", mesh, [Shard(1)])
                if getattr(mod, "bias", None) is not None:
                    distribute_parameter(mod, "bias", mesh, [Replicate()])

        return distribute_module(module, device_mesh, partition, self._prepare_input, self._prepare_output)

    def _prepare_input(self, module, inputs, mesh):
        x = inputs[0]
        shape = None if isinstance(x, DTensor) else (*x.shape[:-1], module_parameter_spec(module, "weight").shape[1])
        x = _to_dtensor(x, mesh, self.input_layouts, shape).redistribute(mesh, [Shard(-1)])
        return (x.to_local(), *inputs[1:])

    def _prepare_output(self, module, output, mesh):
        bias = getattr(module, "bias", None)
        # Each rank added the (replicated) bias to its partial sum; take it out before reducing so it counts once.
        partial = output if bias is None else output - bias
        out = DTensor.from_local(partial, mesh, [Partial()]).redistribute(mesh, [self.output_layouts])
        if bias is not None:
            out = DTensor(out.to_local() + bias, out.device_mesh, out.placements, out.shape)
        return out.to_local() if self.use_local_output else out


class PrepareModuleInput(ParallelStyle):
    """Redistribute positional inputs before forward: ``input_layouts[i] -> desired_input_layouts[i]``.

    ``None`` entries leave that input alone. Local-tensor inputs are read as ``input_layouts`` (even shards).
    """

    def __init__(self, *, input_layouts: Sequence[Placement | None], desired_input_layouts: Sequence[Placement | None],
                 use_local_output: bool = False):
        self.input_layouts, self.desired = _pair(input_layouts, desired_input_layouts, "input")
        self.use_local_output = use_local_output

    def apply(self, module, device_mesh: DeviceMesh):
        _check_mesh(device_mesh, "PrepareModuleInput")
        get_platform().register_forward_pre_hook(module, functools.partial(_prepare_hook, self, device_mesh))
        return module

    def _prepare(self, args, mesh):
        if len(args) < len(self.input_layouts):
            raise ValueError(f"PrepareModuleInput expects {len(self.input_layouts)} inputs, got {len(args)}")
        out = list(args)
        for i, (src, dst) in enumerate(zip(self.input_layouts, self.desired)):
            if src is not None and dst is not None:
                d = _to_dtensor(args[i], mesh, src).redistribute(mesh, [dst])
                out[i] = d.to_local() if self.use_local_output else d
        return tuple(out)


class PrepareModuleOutput(ParallelStyle):
    """Redistribute the output after forward: ``output_layouts -> desired_output_layouts``."""

    def __init__(self, *, output_layouts: Placement, desired_output_layouts: Placement,
                 use_local_output: bool = True):
        self.output_layouts, self.desired = output_layouts, desired_output_layouts
        self.use_local_output = use_local_output

    def apply(self, module, device_mesh: DeviceMesh):
        _check_mesh(device_mesh, "PrepareModuleOutput")
        get_platform().register_forward_hook(module, functools.partial(_prepare_hook, self, device_mesh))
        return module

    def _prepare(self, output, mesh):
        d = _to_dtensor(output, mesh, self.output_layouts).redistribute(mesh, [self.desired])
        return d.to_local() if self.use_local_output else d


def _pair(src, dst, what: str):
    src, dst = tuple(src), tuple(dst)
    if len(src) != len(dst):
        raise ValueError(f"{what}_layouts and desired_{what}_layouts must have the same length, got "
                         f"{len(src)} and {len(dst)}")
    return src, dst


def _prepare_hook(style, device_mesh: DeviceMesh, module, args, *output):
    """The hook of PrepareModuleInput (``(module, args)``) and PrepareModuleOutput (``(module, args, output)``): a
    module-level function bound with ``functools.partial``, so a prepared module pickles."""
    return style._prepare(output[0] if output else args, device_mesh)
