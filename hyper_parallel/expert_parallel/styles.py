"""Expert-parallel styles for any experts module, applied as ``style.apply(experts, mesh)`` on every framework.

| style | mesh | each weight's expert dim | its hidden (FFN) dim | dispatch / combine |
|---|---|---|---|---|
| ``ExpertParallel`` | 1-D (ep) | ``Shard`` | whole | token all-to-all + permute / reverse |
| ``TensorParallel`` | 1-D (tp) | whole | ``Shard`` (each fused half) | input replicated / all-reduce |
| ``ExpertTensorParallel`` | 2-D (ep, tp) | ``Shard`` on ep | ``Shard`` on tp | EP on ``ep``, TP on ``tp`` |

The style learns the experts' parameters and call convention from an
:class:`~hyper_parallel.expert_parallel.layout.ExpertsLayout`: found automatically for this project's
``GroupedExperts``, torchtitan's ``GroupedExperts`` and transformers' experts modules, or passed as ``layout=``.
A weight fusing two projections along its hidden dim (``gate_up_proj``) is split half by half
(:class:`~hyper_parallel.dtensor.placement.StridedShard` for concatenated halves); a bias along the model dim counts
once under tensor parallelism.

After ``apply`` the experts are called exactly as their model calls them and their own forward runs, unmodified, on
the local shards: a pre-forward hook dispatches (the rows each rank computes arrive grouped by local expert, with
the counts as a tensor on the rows' device when a tensor came in, or as host ints when ints came in), a forward hook
combines. For ``call="top_k"`` experts (``experts(hidden, top_k_index, top_k_weights)``) the hook sorts the
(token, expert) pairs by expert, dispatches the rows, calls the experts with each row's local expert id and a weight
of one, and applies the routing weights and the sum over the top-k on the way back.

A style keeps no per-call state: what combine needs travels on the dispatched rows themselves (an attribute of the
tensor the experts receive), so one style object can serve many layers and an activation-checkpoint re-run is safe.
:meth:`BaseExpertParallel.dispatch` / :meth:`BaseExpertParallel.combine` are also callable directly, with an async
dispatch, for a MoE layer that overlaps work with the token all-to-all.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging

from hyper_parallel import collective_checks
from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.dtensor import DTensor
from hyper_parallel.dtensor.module import distribute_module, distribute_parameter
from hyper_parallel.dtensor.placement import Partial, Replicate, Shard, StridedShard
from hyper_parallel.expert_parallel.dispatch import Dispatched, DispatchMeta, token_combine, token_dispatch
from hyper_parallel.expert_parallel.layout import ExpertsLayout, ExpertWeight, layout_of, unknown_experts_error
from hyper_parallel.functional import zeros_connected
from hyper_parallel.parallel.style import ParallelStyle
from hyper_parallel.platform import DTYPE_NAMES

__all__ = ["BaseExpertParallel", "ExpertParallel", "TensorParallel", "ExpertTensorParallel", "dispatched_rows",
           "expert_style_of", "experts_layout_of", "host_counts", "keep_in_graph", "num_global_experts"]

_STYLE_ATTR = "_hyper_parallel_expert_style"
_LAYOUT_ATTR = "_hyper_parallel_experts_layout"
_NUM_EXPERTS_ATTR = "_hyper_parallel_num_experts"
_CALL_ATTR = "_hyper_parallel_dispatch"  # on the rows handed to the experts: what their combine needs
_HOST_COUNTS_ATTR = "_hyper_parallel_host_counts"  # on a counts tensor made from host ints: those ints
_log = logging.getLogger(__name__)


def expert_style_of(module):
    """``(style, mesh)`` applied to ``module`` by an expert-parallel style, or ``None``."""
    return getattr(module, _STYLE_ATTR, None)


def experts_layout_of(module) -> ExpertsLayout | None:
    """The :class:`~hyper_parallel.expert_parallel.layout.ExpertsLayout` a style applied ``module`` with, or
    ``None``."""
    return getattr(module, _LAYOUT_ATTR, None)


def host_counts(num_tokens_per_expert) -> list[int]:
    """Rows per expert as host ints: a tuple or list as is; a counts tensor a style handed to the experts without
    a device-to-host copy (it carries the ints the dispatch already synced); any other tensor by one host sync."""
    if isinstance(num_tokens_per_expert, (list, tuple)):
        return list(num_tokens_per_expert)
    known = getattr(num_tokens_per_expert, _HOST_COUNTS_ATTR, None)
    return list(known) if known is not None else get_platform().tolist(num_tokens_per_expert)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Call:
    """What the combine hook needs from one dispatch, carried on the rows the experts receive."""

    meta: DispatchMeta | None
    expert_of_row: object  # int64 [P]: each row's local expert (built only where a bias or top-k call needs it)
    pairs: _Pairs | None  # top-k call: how to put the rows back into tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Pairs:
    order: object  # int64 [N]: the (token, k) pairs sorted by expert (flat pair indices)
    weights: object  # [T, K] routing weights
    num_tokens: int
    top_k: int
    dtype: object  # the hidden states' dtype, which the experts return


class BaseExpertParallel(ParallelStyle, abc.ABC):
    """Partition / dispatch / combine, wired into ``distribute_module`` (dispatch before the experts' forward,
    combine after it).

    Args:
        layout: the experts' :class:`~hyper_parallel.expert_parallel.layout.ExpertsLayout`; ``None`` finds the
            preset of a recognised module (:func:`~hyper_parallel.expert_parallel.layout.layout_of`).
    """

    def __init__(self, *, layout: ExpertsLayout | None = None):
        if layout is not None and not isinstance(layout, ExpertsLayout):
            raise TypeError(f"{type(self).__name__}: layout must be an ExpertsLayout or None, got "
                            f"{type(layout).__name__}")
        self.layout = layout

    def apply(self, module, device_mesh: DeviceMesh):
        style = type(self).__name__
        if expert_style_of(module) is not None:
            raise ValueError(f"{style}: this {type(module).__name__} already carries "
                             f"{type(expert_style_of(module)[0]).__name__}; apply one expert style per module")
        layout = self.layout if self.layout is not None else layout_of(module)
        if layout is None:
            raise unknown_experts_error(module, style)
        num_experts, hidden = layout.sizes(module, style)
        self._check(module, device_mesh, layout, num_experts, hidden)
        _check_same_experts_everywhere(module, device_mesh, style, layout)
        # Nothing has changed so far; from here on the module is being parallelized.
        object.__setattr__(module, _LAYOUT_ATTR, layout)
        object.__setattr__(module, _NUM_EXPERTS_ATTR, num_experts)
        distribute_module(module, device_mesh, self._partition_fn, self._dispatch_hook)
        local = num_experts // self._ep_degree(device_mesh)
        for attr in layout.expert_count_attrs:
            if getattr(module, attr, None) == num_experts:
                setattr(module, attr, local)  # the forward now sees the local experts only
        p = get_platform()
        p.register_forward_hook(module, functools.partial(_combine_hook, self, device_mesh))  # a partial pickles
        object.__setattr__(module, _STYLE_ATTR, (self, device_mesh))
        _log.info("%s applied to %s on %s", style, type(module).__name__, device_mesh)
        return module

    # ---------------------------------------------------------------- what each style defines
    @abc.abstractmethod
    def _check(self, module, device_mesh: DeviceMesh, layout: ExpertsLayout, num_experts: int,
               hidden: int | None) -> None:
        """Raise ValueError / TypeError if the module or mesh does not fit this style (before any change)."""

    @abc.abstractmethod
    def _placements(self, weight: ExpertWeight, device_mesh: DeviceMesh) -> tuple[DeviceMesh, list]:
        """The mesh and placements of one weight."""

    def _ep_degree(self, device_mesh: DeviceMesh) -> int:
        return 1

    def _tp_mesh(self, device_mesh: DeviceMesh) -> DeviceMesh | None:
        return None

    @abc.abstractmethod
    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh: DeviceMesh, *, async_op: bool = False,
                 num_experts: int | None = None):
        """Bring the rows to the ranks computing them; returns :class:`Dispatched` (or a pending one).

        ``num_experts`` is the experts' global count (:func:`num_global_experts`): with it, counts of another
        length on any rank fail on every rank with a clear error."""

    @abc.abstractmethod
    def combine(self, routed_output, meta, device_mesh: DeviceMesh):
        """Bring the experts' output rows back, in the caller's row order."""

    def _hook_dispatch(self, rows, counts, device_mesh: DeviceMesh, num_experts: int):
        """``(rows for the experts, their counts in the caller's form, meta, host counts or None)``."""
        d = self.dispatch(rows, counts, device_mesh, num_experts=num_experts)
        local = d.num_tokens_per_expert if isinstance(counts, (list, tuple)) else _counts_tensor(d, counts)
        return d.routed_input, local, d.meta, d.num_tokens_per_expert

    # ---------------------------------------------------------------- the hooks
    def _partition_fn(self, name, module, device_mesh):
        if name != "":
            return
        for weight in getattr(module, _LAYOUT_ATTR).weights:
            mesh, placements = self._placements(weight, device_mesh)
            distribute_parameter(module, weight.name, mesh, placements)

    def _dispatch_hook(self, module, inputs, device_mesh):
        if inputs and isinstance(getattr(inputs[0], _CALL_ATTR, None), _Call):
            return inputs  # dispatched already by a MoE layer that overlapped the exchange (see dispatched_rows)
        layout: ExpertsLayout = getattr(module, _LAYOUT_ATTR)
        num_experts = getattr(module, _NUM_EXPERTS_ATTR)
        style = type(self).__name__
        if layout.call == "grouped":
            if len(inputs) != 2:
                raise ValueError(f"{style}: {type(module).__name__} is called grouped, as experts(routed_input, "
                                 f"num_tokens_per_expert); got {len(inputs)} positional arguments")
            rows, counts = inputs
            routed, local, meta, host = self._hook_dispatch(rows, counts, device_mesh, num_experts)
            ids_P = None
            if self._corrects_biases(layout, device_mesh):  # (tensor parallelism alone: the caller's own counts)
                ids_P = _expert_of_row(host if host is not None else host_counts(counts), routed)
            return _carrying(routed, _Call(meta=meta, pairs=None, expert_of_row=ids_P), rows), local
        if len(inputs) != 3:
            raise ValueError(f"{style}: {type(module).__name__} is called with the top-k routing, as "
                             f"experts(hidden_states, top_k_index, top_k_weights); got {len(inputs)} positional "
                             "arguments")
        hidden, index_TK, weights_TK = inputs
        if len(index_TK.shape) != 2 or tuple(weights_TK.shape) != tuple(index_TK.shape) \
                or int(index_TK.shape[0]) != int(hidden.shape[0]):
            raise ValueError(f"{style}: top_k_index and top_k_weights must both be [tokens, top_k] for hidden_states "
                             f"of {int(hidden.shape[0])} tokens, got {list(index_TK.shape)} and "
                             f"{list(weights_TK.shape)}")
        T, K = int(index_TK.shape[0]), int(index_TK.shape[1])
        order_N, counts_G, sorted_ids_N = _sort_pairs(index_TK, num_experts)
        rows = get_platform().kernels.gather_pairs(hidden, order_N, K) if T \
            else zeros_connected(hidden, (0, int(hidden.shape[1])))
        routed, _, meta, host = self._hook_dispatch(rows, counts_G, device_mesh, num_experts)
        ids_P = sorted_ids_N if host is None else _expert_of_row(host, routed)
        call = _Call(meta=meta, expert_of_row=ids_P,
                     pairs=_Pairs(order=order_N, weights=weights_TK, num_tokens=T, top_k=K, dtype=hidden.dtype))
        one = (ids_P.reshape(-1, 1) * 0 + 1).to(weights_TK.dtype)
        return _carrying(routed, call, hidden), ids_P.reshape(-1, 1).to(index_TK.dtype), one

    def _corrects_biases(self, layout: ExpertsLayout, device_mesh: DeviceMesh) -> bool:
        tp = self._tp_mesh(device_mesh)
        return tp is not None and tp.get_local_rank() != 0 and any(w.output_bias for w in layout.weights)


def _combine_hook(style: BaseExpertParallel, device_mesh: DeviceMesh, module, args, output):
    call = getattr(args[0], _CALL_ATTR, None)
    assert isinstance(call, _Call), "the experts' input lost the dispatch it came from"
    layout: ExpertsLayout = getattr(module, _LAYOUT_ATTR)
    out = keep_in_graph(output, module, call.meta, args[0])
    if style._corrects_biases(layout, device_mesh):
        out = _without_extra_biases(out, module, layout, call.expert_of_row)
    out = style.combine(out, call.meta, device_mesh)
    return out if call.pairs is None else _sum_pairs(out, call.pairs)


def dispatched_rows(d: Dispatched):
    """The rows of a finished :meth:`BaseExpertParallel.dispatch`, marked so that calling the experts module on
    them (``experts(dispatched_rows(d), d.num_tokens_per_expert)``) runs its forward AND its hooks (FSDP's, a
    profiler's) while the style's own hooks skip the dispatch and still combine: how a MoE layer that overlaps its
    shared experts with the token exchange calls its routed experts. Grouped experts only."""
    return _carrying(d.routed_input, _Call(meta=d.meta, expert_of_row=None, pairs=None), None)


def _carrying(routed, call: _Call, source):
    """``routed`` with ``call`` attached; a fresh view when ``routed`` is the caller's own tensor."""
    if routed is source:
        routed = routed.reshape(tuple(routed.shape))
        if routed is source:
            routed = routed * 1
    setattr(routed, _CALL_ATTR, call)
    return routed


def _counts_tensor(d: Dispatched, like):
    """The local counts as a tensor of the caller's dtype, carrying their host ints (no device-to-host copy
    later)."""
    counts = d.counts_tensor().to(like.dtype)
    setattr(counts, _HOST_COUNTS_ATTR, tuple(d.num_tokens_per_expert))
    return counts


def _expert_of_row(counts, rows):
    """int64 ``[P]``: the local expert of each row grouped by expert, from the host counts."""
    p = get_platform()
    device = getattr(rows, "device", None)
    P = int(rows.shape[0])
    if len(counts) == 1 or P == 0:
        return p.zeros((P,), dtype="int64", device=device)
    ends, total = [], 0
    for c in counts[:-1]:
        total += int(c)
        ends.append(total)
    return (p.arange(P, device=device).reshape(-1, 1) >= p.tensor(ends, dtype="int64", device=device)).sum(1) \
        .to(p.dtype("int64"))


def _sort_pairs(index_TK, num_experts: int):
    """``(pair order [N], counts per expert [G], each sorted pair's expert [N])`` for top-k expert ids."""
    p = get_platform()
    ids_N = p.kernels.convert(index_TK.reshape(-1), "int64")
    device = getattr(index_TK, "device", None)
    if ids_N.shape[0] == 0:
        empty = p.zeros((0,), dtype="int64", device=device)
        return empty, p.zeros((num_experts,), dtype="int64", device=device), empty
    order_N = p.kernels.stable_order(ids_N)
    return order_N, p.kernels.expert_counts(ids_N, num_experts), ids_N[order_N]


def _sum_pairs(rows_N, pairs: _Pairs):
    """Rows in sorted-pair order -> each token's routing-weighted sum over its top-k, in the hidden dtype."""
    p = get_platform()
    T, K = pairs.num_tokens, pairs.top_k
    D = int(rows_N.shape[-1])
    if T == 0:
        return zeros_connected(rows_N, (0, D)).to(pairs.dtype)
    weighted = rows_N * pairs.weights.reshape(-1)[pairs.order].reshape(-1, 1).to(rows_N.dtype)
    slots = p.zeros((T * K, D), dtype=p.dtype_name(weighted.dtype), device=getattr(rows_N, "device", None))
    slots[pairs.order] = weighted
    return slots.reshape(T, K, D).sum(1).to(pairs.dtype)


def _without_extra_biases(out, module, layout: ExpertsLayout, expert_of_row):
    """On tp ranks other than the first, take the model-dim biases back out of the partial sums (value only: the
    gradient still reaches the bias on every rank, as each rank's copy of it is a replica)."""
    p = get_platform()
    for weight in layout.weights:
        if not weight.output_bias:
            continue
        bias = getattr(module, weight.name)
        if weight.expert_dim:
            bias = bias.swapaxes(0, weight.expert_dim)
        rows = bias[expert_of_row].reshape(tuple(out.shape)).to(out.dtype)
        out = p.autograd_function(lambda y, rows=rows: y - rows, lambda g: g)(out)
    return out


def expert_style_or_default(style, caller: str) -> BaseExpertParallel:
    """``style``, or ``ExpertParallel()`` for ``None`` (what the third-party integrations take).

    Raises:
        TypeError: ``style`` is not an expert style.
    """
    if style is None:
        return ExpertParallel()
    if not isinstance(style, BaseExpertParallel):
        raise TypeError(f"{caller}: style must be ExpertParallel, TensorParallel or ExpertTensorParallel (a "
                        f"BaseExpertParallel), got {type(style).__name__}")
    return style


def num_global_experts(module) -> int:
    """The experts' global count (recorded when a style was applied; else read from the preset layout)."""
    known = getattr(module, _NUM_EXPERTS_ATTR, None)
    if known is not None:
        return int(known)
    layout = layout_of(module)
    if layout is None:
        raise TypeError(f"num_global_experts: {type(module).__name__} carries no expert style and is not a "
                        "recognised experts module")
    return layout.sizes(module, "num_global_experts")[0]


def keep_in_graph(routed_output, module, meta, routed_input=None):
    """The experts' output, made to depend on the experts' parameters (and on ``routed_input``, the rows they
    received) on a rank that received no rows.

    Every rank must run the combine's backward all-to-all when any rank does. A rank with rows has an output that
    depends on the expert weights; a rank without rows has an empty output that depends only on its (empty) input,
    or on nothing at all when the experts return fresh zeros (as transformers' do), which needs no gradient when
    the layer's input does not (a first layer fed by data): it would skip the backward exchange its peers wait in.
    Tying the empty output to the trainable parameters (with zero gradients) keeps its ``requires grad`` the same
    as its peers'; tying it to the received rows keeps the dispatch's backward exchange in the graph too, when the
    layer's input needs a gradient and the experts' output does not depend on their input. Costs nothing on ranks
    with rows.
    """
    if not isinstance(meta, DispatchMeta) or meta.indices.num_rows:
        return routed_output
    shape = tuple(routed_output.shape)
    if routed_input is not None:
        routed_output = routed_output + zeros_connected(routed_input, shape)
    for _, param in get_platform().named_parameters(module):
        routed_output = routed_output + zeros_connected(param, shape)
    return routed_output


_SIGNATURE_DIMS = 4


def _check_same_experts_everywhere(module, device_mesh: DeviceMesh, style: str, layout: ExpertsLayout) -> None:
    """Raise on every rank when the experts' parameter shapes or dtypes differ across the mesh (before anything
    is sharded: a broadcast between different shapes aborts the process). One all-gather per mesh axis, at apply."""
    p = get_platform()
    width = _SIGNATURE_DIMS + 2
    signature = []
    for name in layout.names:
        w = getattr(module, name)
        shape = [int(d) for d in w.shape]
        if len(shape) > _SIGNATURE_DIMS:
            raise TypeError(f"{style}: expert weights of up to {_SIGNATURE_DIMS} dims are supported, {name} has "
                            f"{list(shape)}")
        signature += [len(shape), *shape, *[-1] * (_SIGNATURE_DIMS - len(shape)),
                      DTYPE_NAMES.index(p.dtype_name(w.dtype))]
    mine = p.tensor(signature, dtype="int64")
    for axis in range(device_mesh.ndim):
        group = device_mesh.get_group(axis)
        rows = p.tolist(p.all_gather_into_tensor(mine, group=group))
        n = len(signature)
        table = [rows[j * n:(j + 1) * n] for j in range(group.size)]
        if any(row != table[0] for row in table):
            def describe(row):
                return ", ".join(f"{name} {row[i * width + 1:i * width + 1 + row[i * width]]} "
                                 f"{DTYPE_NAMES[row[i * width + width - 1]]}" for i, name in enumerate(layout.names))
            described = "; ".join(f"rank {r}: {describe(row)}" for r, row in zip(group.ranks, table))
            raise ValueError(f"{style}: the experts must be built the same on every rank of the mesh, got {described}")


def _check_divides(degree: int, size: int, what: str, axis: str) -> None:
    if size % degree:
        raise ValueError(f"{axis} parallel degree ({degree}) must divide {what} ({size})")


def _axis_mesh(mesh: DeviceMesh, axis: str, style: str) -> DeviceMesh:
    names = list(mesh.mesh_dim_names or ())
    if axis not in names:
        raise ValueError(f"{style} needs a mesh with axes ('ep', 'tp'); this mesh has axes {names or None}")
    return mesh[axis]


def _check_tensor_parallel(module, layout: ExpertsLayout, hidden: int | None, tp: int, style: str) -> None:
    if hidden is None:
        raise TypeError(f"{style}: tensor parallelism splits the experts' hidden dim, and the layout of "
                        f"{type(module).__name__} names none (give a weight hidden_dim=...)")
    odd = [w.name for w in layout.weights if w.hidden_dim is None and not w.output_bias]
    if odd:
        raise TypeError(f"{style}: {odd} of {type(module).__name__} have no hidden dim and are not an output bias; "
                        "tensor parallelism cannot tell how to split them (set hidden_dim or output_bias=True)")
    _check_divides(tp, hidden, "the experts' hidden_dim", "tensor")


def _tp_placement(weight: ExpertWeight):
    if weight.hidden_dim is None:
        return Replicate()  # an output bias (checked at apply)
    if weight.fused == "concat":
        return StridedShard(weight.hidden_dim, split_factor=2)  # each half split: [gate_r; up_r]
    return Shard(weight.hidden_dim)  # interleaved halves stay paired in contiguous chunks


class ExpertParallel(BaseExpertParallel):
    """Each rank of a 1-D mesh owns ``num_experts / ep`` whole experts.

    Args:
        align: pad each local expert's rows to a multiple of 1, 8, 16 or 32 (for grouped GEMM kernels).
        layout: see :class:`BaseExpertParallel`.
    """

    def __init__(self, *, align: int = 1, layout: ExpertsLayout | None = None):
        super().__init__(layout=layout)
        self.align = align

    def _check(self, module, device_mesh, layout, num_experts, hidden):
        if device_mesh.ndim != 1:
            raise ValueError(f"ExpertParallel needs a 1-D mesh (slice it: mesh['ep']), got {device_mesh}")
        _check_divides(device_mesh.size(), num_experts, "num_experts", "expert")

    def _placements(self, weight, device_mesh):
        return device_mesh, [Shard(weight.expert_dim)]

    def _ep_degree(self, device_mesh):
        return device_mesh.size()

    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh, *, async_op=False, num_experts=None):
        return token_dispatch(routed_input, num_tokens_per_expert, device_mesh.get_group(), num_experts=num_experts,
                              align=self.align, async_op=async_op)

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
        layout: see :class:`BaseExpertParallel`.
    """

    def __init__(self, *, partial_output: bool = False, layout: ExpertsLayout | None = None):
        super().__init__(layout=layout)
        self.partial_output = partial_output

    def _check(self, module, device_mesh, layout, num_experts, hidden):
        if device_mesh.ndim != 1:
            raise ValueError(f"TensorParallel needs a 1-D mesh (slice it: mesh['tp']), got {device_mesh}")
        _check_tensor_parallel(module, layout, hidden, device_mesh.size(), "TensorParallel")

    def _placements(self, weight, device_mesh):
        return device_mesh, [_tp_placement(weight)]

    def _tp_mesh(self, device_mesh):
        return device_mesh

    def _hook_dispatch(self, rows, counts, device_mesh, num_experts):
        return _replicated_input(rows, device_mesh), counts, None, None

    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh, *, async_op=False, num_experts=None):
        d = Dispatched(routed_input=_replicated_input(routed_input, device_mesh),
                       num_tokens_per_expert=tuple(host_counts(num_tokens_per_expert)), meta=None)
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

    def __init__(self, *, align: int = 1, partial_output: bool = False, layout: ExpertsLayout | None = None):
        super().__init__(layout=layout)
        self.align, self.partial_output = align, partial_output

    def _check(self, module, device_mesh, layout, num_experts, hidden):
        if device_mesh.ndim != 2:
            raise ValueError(f"ExpertTensorParallel needs a 2-D mesh with axes ('ep', 'tp'), got {device_mesh}")
        ep = _axis_mesh(device_mesh, "ep", "ExpertTensorParallel")
        tp = _axis_mesh(device_mesh, "tp", "ExpertTensorParallel")
        _check_divides(ep.size(), num_experts, "num_experts", "expert")
        _check_tensor_parallel(module, layout, hidden, tp.size(), "ExpertTensorParallel")

    def _placements(self, weight, device_mesh):
        return device_mesh["ep", "tp"], [Shard(weight.expert_dim), _tp_placement(weight)]

    def _ep_degree(self, device_mesh):
        return device_mesh["ep"].size()

    def _tp_mesh(self, device_mesh):
        return device_mesh["tp"]

    def dispatch(self, routed_input, num_tokens_per_expert, device_mesh, *, async_op=False, num_experts=None):
        if collective_checks.enabled():
            collective_checks.check_same_tokens(get_platform(), routed_input, num_tokens_per_expert,
                                                device_mesh["ep", "tp"])
        pending = token_dispatch(routed_input, num_tokens_per_expert, device_mesh["ep"].get_group(),
                                 num_experts=num_experts, align=self.align, async_op=True)
        tp = device_mesh["tp"]
        finish = lambda d: dataclasses.replace(d, routed_input=_replicated_input(d.routed_input, tp))
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
