"""Expert-parallel styles for :class:`~hyper_parallel.moe.experts.GroupedExpertsMixin` layers, applied as
``style.apply(experts, mesh)`` on every framework.

| style | mesh | w1, w3 ``[E, H, D]`` | w2 ``[E, D, H]`` | dispatch / combine |
|---|---|---|---|---|
| ``ExpertParallel`` | 1-D (ep) | ``Shard(0)`` | ``Shard(0)`` | token all-to-all + permute / reverse |
| ``TensorParallel`` | 1-D (tp) | ``Shard(1)`` | ``Shard(2)`` | input replicated (grad all-reduced) / all-reduce |
| ``ExpertTensorParallel`` | 2-D (ep, tp) | ``[S(0), S(1)]`` | ``[S(0), S(2)]`` | EP on ``ep``, TP on ``tp`` |

A style keeps no per-call state: dispatch hands a frozen :class:`~hyper_parallel.expert_parallel.dispatch.
DispatchMeta` to the experts' forward (their ``dispatch`` argument) and combine reads it back from there, so one
style object can serve many layers. :meth:`BaseExpertParallel.dispatch` / :meth:`BaseExpertParallel.combine` are
also callable directly, with an async dispatch, for a MoE layer that overlaps work with the token all-to-all.
"""

from __future__ import annotations

import abc
import functools
import logging

from hyper_parallel import collective_checks
from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.dtensor import DTensor
from hyper_parallel.dtensor.module import distribute_module, distribute_parameter, module_parameter_spec
from hyper_parallel.dtensor.placement import Partial, Replicate, Shard
from hyper_parallel.expert_parallel.dispatch import Dispatched, DispatchMeta, token_combine, token_dispatch
from hyper_parallel.functional import zeros_connected
from hyper_parallel.parallel.style import ParallelStyle
from hyper_parallel.platform import DTYPE_NAMES

__all__ = ["BaseExpertParallel", "ExpertParallel", "TensorParallel", "ExpertTensorParallel", "expert_style_of",
           "keep_in_graph", "num_global_experts"]

_STYLE_ATTR = "_hyper_parallel_expert_style"
_log = logging.getLogger(__name__)


def expert_style_of(module):
    """``(style, mesh)`` applied to ``module`` by an expert-parallel style, or ``None``."""
    return getattr(module, _STYLE_ATTR, None)


class BaseExpertParallel(ParallelStyle, abc.ABC):
    """Partition / dispatch / combine, wired into ``distribute_module`` (dispatch before the experts' forward,
    combine after it)."""

    def apply(self, module, device_mesh: DeviceMesh):
        self._check(module, device_mesh)
        _check_same_experts_everywhere(module, device_mesh, type(self).__name__)
        p = get_platform()
        distribute_module(module, device_mesh, self._partition_fn, self._dispatch_hook)
        p.register_forward_hook(module, functools.partial(_combine_hook, self, device_mesh))  # a partial pickles
        object.__setattr__(module, _STYLE_ATTR, (self, device_mesh))
        _log.info("%s applied to %s on %s", type(self).__name__, type(module).__name__, device_mesh)
        return module

    def _dispatch_hook(self, module, inputs, device_mesh):
        if len(inputs) != 2:
            raise ValueError(f"{type(self).__name__}: call the experts as experts(routed_input, "
                             f"num_tokens_per_expert); got {len(inputs)} positional arguments")
        d = self.dispatch(inputs[0], inputs[1], device_mesh, num_experts=num_global_experts(module))
        return d.routed_input, d.num_tokens_per_expert, d.meta

    @abc.abstractmethod
    def _check(self, module, device_mesh: DeviceMesh) -> None:
        """Raise ValueError if the module or mesh does not fit this style."""

    @abc.abstractmethod
    def _partition_fn(self, name: str, module, device_mesh: DeviceMesh) -> None:
        """Shard the experts' parameters."""

    @abc.abstractmethod
    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh: DeviceMesh, *, async_op: bool = False,
                 num_experts: int | None = None):
        """Bring the rows to the ranks computing them; returns :class:`Dispatched` (or a pending one).

        ``num_experts`` is the experts' global count (:func:`num_global_experts`): with it, counts of another
        length on any rank fail on every rank with a clear error."""

    @abc.abstractmethod
    def combine(self, routed_output, meta, device_mesh: DeviceMesh):
        """Bring the experts' output rows back, in the caller's row order."""


def _combine_hook(style: BaseExpertParallel, device_mesh: DeviceMesh, module, args, output):
    return style.combine(keep_in_graph(output, module, args[2]), args[2], device_mesh)


def num_global_experts(module) -> int:
    """The experts' global count: dim 0 of ``w1``'s global shape (its recorded layout once sharded)."""
    spec = module_parameter_spec(module, "w1")
    return int(spec.shape[0] if spec is not None else module.w1.shape[0])


def keep_in_graph(routed_output, module, meta):
    """The experts' output, made to depend on the experts' parameters on a rank that received no rows.

    Every rank must run the combine's backward all-to-all when any rank does. A rank with rows has an output that
    depends on the expert weights; a rank without rows has an empty output that depends only on its (empty) input,
    which needs no gradient when the layer's input does not (a first layer fed by data): it would skip the backward
    exchange its peers wait in. Tying the empty output to the trainable parameters (with zero gradients) keeps its
    ``requires grad`` the same as its peers'. Costs nothing on ranks with rows.
    """
    if not isinstance(meta, DispatchMeta) or meta.indices.num_rows:
        return routed_output
    shape = tuple(routed_output.shape)
    for _, param in get_platform().named_parameters(module):
        routed_output = routed_output + zeros_connected(param, shape)
    return routed_output


def _check_same_experts_everywhere(module, device_mesh: DeviceMesh, style: str) -> None:
    """Raise on every rank when the experts' parameter shapes or dtypes differ across the mesh (before anything
    is sharded: a broadcast between different shapes aborts the process). One all-gather per mesh axis, at apply."""
    p = get_platform()
    names = ("w1", "w2", "w3")
    signature = []
    for name in names:
        w = getattr(module, name)
        signature += [*(int(d) for d in w.shape), DTYPE_NAMES.index(p.dtype_name(w.dtype))]
    mine = p.tensor(signature, dtype="int64")
    for axis in range(device_mesh.ndim):
        group = device_mesh.get_group(axis)
        rows = p.tolist(p.all_gather_into_tensor(mine, group=group))
        width = len(signature)
        table = [rows[j * width:(j + 1) * width] for j in range(group.size)]
        if any(row != table[0] for row in table):
            described = "; ".join(f"rank {r}: " + ", ".join(
                f"{n} {row[4 * i:4 * i + 3]} {DTYPE_NAMES[row[4 * i + 3]]}" for i, n in enumerate(names))
                for r, row in zip(group.ranks, table))
            raise ValueError(f"{style}: the experts must be built the same on every rank of the mesh, got {described}")


def _check_experts(module, style: str) -> None:
    for name in ("w1", "w2", "w3"):
        w = getattr(module, name, None)
        if w is None or len(w.shape) != 3:
            raise TypeError(f"{style} applies to GroupedExperts-like modules with 3-D w1, w2, w3; "
                            f"{type(module).__name__} has {name}={None if w is None else list(w.shape)}")


def _check_divides(degree: int, size: int, what: str, axis: str) -> None:
    if size % degree:
        raise ValueError(f"{axis} parallel degree ({degree}) must divide {what} ({size})")


def _axis_mesh(mesh: DeviceMesh, axis: str, style: str) -> DeviceMesh:
    names = list(mesh.mesh_dim_names or ())
    if axis not in names:
        raise ValueError(f"{style} needs a mesh with axes ('ep', 'tp'); this mesh has axes {names or None}")
    return mesh[axis]


class ExpertParallel(BaseExpertParallel):
    """Each rank of a 1-D mesh owns ``num_experts / ep`` whole experts.

    Args:
        align: pad each local expert's rows to a multiple of 1, 8, 16 or 32 (for grouped GEMM kernels).
    """

    def __init__(self, *, align: int = 1):
        self.align = align

    def _check(self, module, device_mesh):
        _check_experts(module, "ExpertParallel")
        if device_mesh.ndim != 1:
            raise ValueError(f"ExpertParallel needs a 1-D mesh (slice it: mesh['ep']), got {device_mesh}")
        _check_divides(device_mesh.size(), module.w1.shape[0], "num_experts", "expert")

    def _partition_fn(self, name, module, device_mesh):
        if name == "":
            for w in ("w1", "w2", "w3"):
                distribute_parameter(module, w, device_mesh, [Shard(0)])

    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh, *, async_op=False, num_experts=None):
        return token_dispatch(routed_input, num_tokens_per_expert, device_mesh.get_group(), num_experts=num_experts,
                              align=self.align,
                              async_op=async_op)

    def combine(self, routed_output, meta, device_mesh):
        return token_combine(routed_output, meta)


def _replicated_input(x, tp_mesh: DeviceMesh):
    # Each TP rank computes only its hidden slice's share of d(loss)/d(input): the gradient is Partial.
    return DTensor.from_local(x, tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def _reduce_output(y, tp_mesh: DeviceMesh):
    # Each TP rank's output is a partial sum over its hidden slice.
    return DTensor.from_local(y, tp_mesh, [Partial()]).redistribute(tp_mesh, [Replicate()]).to_local()


class TensorParallel(BaseExpertParallel):
    """Every expert's hidden dimension split over a 1-D mesh; no token exchange.

    Args:
        partial_output: leave the output a per-rank partial sum (for fusion with a following reduction) instead
            of all-reducing it.
    """

    def __init__(self, *, partial_output: bool = False):
        self.partial_output = partial_output

    def _check(self, module, device_mesh):
        _check_experts(module, "TensorParallel")
        if device_mesh.ndim != 1:
            raise ValueError(f"TensorParallel needs a 1-D mesh (slice it: mesh['tp']), got {device_mesh}")
        _check_divides(device_mesh.size(), module.w1.shape[1], "the experts' hidden_dim", "tensor")

    def _partition_fn(self, name, module, device_mesh):
        if name == "":
            distribute_parameter(module, "w1", device_mesh, [Shard(1)])
            distribute_parameter(module, "w3", device_mesh, [Shard(1)])
            distribute_parameter(module, "w2", device_mesh, [Shard(2)])

    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh, *, async_op=False, num_experts=None):
        counts = num_tokens_per_expert
        if not isinstance(counts, (list, tuple)):
            counts = get_platform().tolist(counts)
        d = Dispatched(routed_input=_replicated_input(routed_input, device_mesh),
                       num_tokens_per_expert=tuple(counts), meta=None)
        return _Done(d) if async_op else d

    def combine(self, routed_output, meta, device_mesh):
        return routed_output if self.partial_output else _reduce_output(routed_output, device_mesh)


class ExpertTensorParallel(BaseExpertParallel):
    """Experts split over ``mesh["ep"]`` and each expert's hidden dimension over ``mesh["tp"]``.

    The ranks of one ``tp`` line must hold the same routed tokens (as after a tensor-parallel attention block);
    ``HYPER_PARALLEL_CHECK_COLLECTIVES=1`` checks it at every dispatch (one small all-gather over the mesh). By
    default the output equals the single-device output on every rank; ``partial_output=True`` leaves it a partial
    sum over ``tp`` for fusion with a following reduction.
    """

    def __init__(self, *, align: int = 1, partial_output: bool = False):
        self.align, self.partial_output = align, partial_output

    def _check(self, module, device_mesh):
        _check_experts(module, "ExpertTensorParallel")
        if device_mesh.ndim != 2:
            raise ValueError(f"ExpertTensorParallel needs a 2-D mesh with axes ('ep', 'tp'), got {device_mesh}")
        ep = _axis_mesh(device_mesh, "ep", "ExpertTensorParallel")
        tp = _axis_mesh(device_mesh, "tp", "ExpertTensorParallel")
        _check_divides(ep.size(), module.w1.shape[0], "num_experts", "expert")
        _check_divides(tp.size(), module.w1.shape[1], "the experts' hidden_dim", "tensor")

    def _partition_fn(self, name, module, device_mesh):
        if name == "":
            mesh = device_mesh["ep", "tp"]
            distribute_parameter(module, "w1", mesh, [Shard(0), Shard(1)])
            distribute_parameter(module, "w3", mesh, [Shard(0), Shard(1)])
            distribute_parameter(module, "w2", mesh, [Shard(0), Shard(2)])

    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh, *, async_op=False, num_experts=None):
        if collective_checks.enabled():
            collective_checks.check_same_tokens(get_platform(), routed_input, num_tokens_per_expert,
                                                device_mesh["ep", "tp"])
        pending = token_dispatch(routed_input, num_tokens_per_expert, device_mesh["ep"].get_group(),
                                 num_experts=num_experts,
                                 align=self.align, async_op=True)
        tp = device_mesh["tp"]
        finish = lambda d: Dispatched(routed_input=_replicated_input(d.routed_input, tp),
                                      num_tokens_per_expert=d.num_tokens_per_expert, meta=d.meta)
        return _Then(pending, finish) if async_op else finish(pending.wait())

    def combine(self, routed_output, meta, device_mesh):
        if not self.partial_output:
            routed_output = _reduce_output(routed_output, device_mesh["tp"])
        return token_combine(routed_output, meta)


class _Done:
    """An already-completed pending dispatch."""

    def __init__(self, value):
        self._value = value

    def wait(self):
        return self._value


class _Then:
    """A pending dispatch followed by a local step."""

    def __init__(self, pending, then):
        self._pending, self._then = pending, then

    def wait(self):
        return self._then(self._pending.wait())
