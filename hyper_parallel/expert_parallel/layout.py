"""How an experts module stores its weights and how its model calls it: what a style needs to shard any experts
module and to run its own forward, unmodified, on the local shards.

An :class:`ExpertsLayout` names every parameter of the experts module (:class:`ExpertWeight`: which dim holds the
experts, which the hidden (FFN) dim that tensor parallelism splits, whether two projections are fused along it) and
the call convention:

* ``"grouped"``: ``experts(routed_input [N, D], num_tokens_per_expert [E]) -> [N, D]``, rows grouped by expert
  (this project's ``GroupedExperts``, torchtitan's ``GroupedExperts``);
* ``"top_k"``: ``experts(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]``, the weighted
  sum over each token's experts (transformers' experts modules).

Presets are found automatically (:func:`layout_of`) for this project's ``GroupedExperts``, torchtitan 0.3.0's
``GroupedExperts`` and every transformers 5.x experts class built by ``use_experts_implementation``; any other module
takes ``layout=`` on the style:

>>> ExpertsLayout(weights=(ExpertWeight("w_in", hidden_dim=2, fused="concat"), ExpertWeight("w_out", hidden_dim=1)))
... # doctest: +ELLIPSIS
ExpertsLayout(weights=(ExpertWeight(name='w_in', ...
"""

from __future__ import annotations

import dataclasses

from hyper_parallel._select import get_platform

__all__ = ["CALLS", "FUSIONS", "ExpertWeight", "ExpertsLayout", "GROUPED_EXPERTS", "TORCHTITAN_GROUPED_EXPERTS",
           "layout_of", "transformers_layout", "unknown_experts_error"]

FUSIONS = (None, "concat", "interleave")
"""How two projections share one weight along its hidden dim: not at all, as concatenated halves ``[gate; up]``,
or as interleaved rows ``[gate0, up0, gate1, up1, ...]``."""
CALLS = ("grouped", "top_k")
"""The experts' call conventions (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class ExpertWeight:
    """One parameter of an experts module.

    Args:
        name: the parameter's attribute name on the experts module.
        expert_dim: the dim indexing the experts (expert parallelism shards it).
        hidden_dim: the experts' hidden (FFN) dim, which tensor parallelism shards; ``None`` for a parameter with
            no hidden dim (then it must be an ``output_bias``, or the module cannot be tensor-parallel).
        fused: ``"concat"`` or ``"interleave"`` when the hidden dim holds two projections (then tensor parallelism
            splits each of them); ``None`` otherwise.
        output_bias: a bias added to the experts' output (along the model dim, e.g. gpt-oss ``down_proj_bias``).
            Under tensor parallelism every rank adds it to its partial sum; the style removes the extra copies so
            it counts exactly once, with its full gradient on every rank.

    Raises:
        TypeError / ValueError: a field of the wrong type or value.
    """

    name: str
    expert_dim: int = 0
    hidden_dim: int | None = None
    fused: str | None = None
    output_bias: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"ExpertWeight: name must be a non-empty str, got {self.name!r}")
        for field in ("expert_dim", "hidden_dim"):
            value = getattr(self, field)
            if value is None and field == "hidden_dim":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"ExpertWeight({self.name!r}): {field} must be an int >= 0"
                                f"{' or None' if field == 'hidden_dim' else ''}, got {value!r}")
        if self.hidden_dim is not None and self.hidden_dim == self.expert_dim:
            raise ValueError(f"ExpertWeight({self.name!r}): expert_dim and hidden_dim must differ, both are "
                             f"{self.expert_dim}")
        if self.fused not in FUSIONS:
            raise ValueError(f"ExpertWeight({self.name!r}): fused must be one of {list(FUSIONS)}, got {self.fused!r}")
        if self.fused is not None and self.hidden_dim is None:
            raise ValueError(f"ExpertWeight({self.name!r}): fused={self.fused!r} needs the hidden_dim it fuses along")
        if not isinstance(self.output_bias, bool):
            raise TypeError(f"ExpertWeight({self.name!r}): output_bias must be a bool, got {self.output_bias!r}")
        if self.output_bias and self.hidden_dim is not None:
            raise ValueError(f"ExpertWeight({self.name!r}): an output_bias follows the model dim, so hidden_dim must "
                             f"be None, got {self.hidden_dim}")


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """Every parameter of an experts module and its call convention.

    Args:
        weights: one :class:`ExpertWeight` per parameter of the module (all of them: a parameter the layout does
            not name would stay full-size while the others are sharded).
        call: ``"grouped"`` or ``"top_k"`` (see the module docstring).
        expert_count_attrs: int attributes of the module holding the number of experts that its forward reads
            (transformers' ``num_experts``); expert parallelism sets them to the local count, as the forward then
            sees only the local experts.
    """

    weights: tuple[ExpertWeight, ...]
    call: str = "grouped"
    expert_count_attrs: tuple[str, ...] = ()

    def __post_init__(self):
        weights = tuple(self.weights) if isinstance(self.weights, (list, tuple)) else self.weights
        if not isinstance(weights, tuple) or not weights or not all(isinstance(w, ExpertWeight) for w in weights):
            raise TypeError(f"ExpertsLayout: weights must be a non-empty tuple of ExpertWeight, got {self.weights!r}")
        names = [w.name for w in weights]
        if len(set(names)) != len(names):
            raise ValueError(f"ExpertsLayout: each weight is named once, got {names}")
        if self.call not in CALLS:
            raise ValueError(f"ExpertsLayout: call must be one of {list(CALLS)}, got {self.call!r}")
        attrs = tuple(self.expert_count_attrs)
        if not all(isinstance(a, str) for a in attrs):
            raise TypeError(f"ExpertsLayout: expert_count_attrs must be attribute names, got {attrs!r}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "expert_count_attrs", attrs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.weights)

    def sizes(self, module, style: str) -> tuple[int, int | None]:
        """``(num_experts, hidden_dim)`` of ``module`` under this layout (hidden ``None`` when no weight has one).

        Raises:
            TypeError: the module's parameters do not match the layout (a missing or undescribed parameter, a dim
                out of range, expert or hidden sizes that disagree, an odd fused size); the message names the
                module's parameters and the ``layout=`` argument that would describe them.
        """
        params = _own_parameters(module)
        problem = None
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in self.names]
        if missing:
            problem = f"it has no parameter {missing}"
        elif extra:
            problem = f"the layout does not describe {extra}"
        experts, hidden = set(), set()
        for w in self.weights if problem is None else ():
            shape = tuple(int(d) for d in params[w.name].shape)
            dims = (w.expert_dim,) + (() if w.hidden_dim is None else (w.hidden_dim,))
            if max(dims) >= len(shape):
                problem = f"{w.name} {list(shape)} has no dim {max(dims)}"
                break
            experts.add(shape[w.expert_dim])
            if w.hidden_dim is not None:
                size = shape[w.hidden_dim]
                if w.fused is not None and size % 2:
                    problem = f"{w.name} {list(shape)} fuses two projections along dim {w.hidden_dim} of odd size"
                    break
                hidden.add(size // 2 if w.fused else size)
        if problem is None and len(experts) > 1:
            problem = f"the expert dims disagree ({sorted(experts)} experts)"
        if problem is None and len(hidden) > 1:
            problem = f"the hidden dims disagree ({sorted(hidden)})"
        if problem is not None:
            raise TypeError(f"{style}: {type(module).__name__} does not fit its experts layout: {problem}. "
                            f"{_describe(module, style)}")
        return experts.pop(), (hidden.pop() if hidden else None)


def unknown_experts_error(module, style: str) -> TypeError:
    """The error for an experts module no preset recognises."""
    return TypeError(f"{style}: {type(module).__name__} is not a recognised experts module (presets: this project's "
                     "and torchtitan's GroupedExperts, transformers' experts modules). "
                     f"{_describe(module, style)}")


def _describe(module, style: str) -> str:
    p = get_platform()
    described = ", ".join(f"{n} {list(q.shape)} {p.dtype_name(q.dtype)}" for n, q in _own_parameters(module).items())
    return (f"Its parameters: {described or 'none'}. Describe them with {style}(layout=ExpertsLayout(weights=("
            "ExpertWeight(name, expert_dim=..., hidden_dim=..., fused=None | 'concat' | 'interleave', "
            "output_bias=...), ...), call='grouped' | 'top_k')); the module is left unchanged")


def _own_parameters(module) -> dict:
    return {n: q for n, q in get_platform().named_parameters(module) if "." not in n}


def _grouped_layout(w1: str, w2: str, w3: str) -> ExpertsLayout:
    return ExpertsLayout(weights=(ExpertWeight(w1, hidden_dim=1), ExpertWeight(w2, hidden_dim=2),
                                  ExpertWeight(w3, hidden_dim=1)))


GROUPED_EXPERTS = _grouped_layout("w1", "w2", "w3")
"""This project's ``GroupedExperts``: ``w1``, ``w3`` ``[E, H, D]``, ``w2`` ``[E, D, H]``, called grouped."""
TORCHTITAN_GROUPED_EXPERTS = _grouped_layout("w1_EFD", "w2_EDF", "w3_EFD")
"""torchtitan 0.3.0's ``GroupedExperts``: ``w1_EFD``, ``w3_EFD`` ``[E, F, D]``, ``w2_EDF`` ``[E, D, F]``."""


def transformers_layout(module) -> ExpertsLayout | None:
    """The layout of a transformers 5.x experts module (a class decorated with ``use_experts_implementation``),
    read from the attributes the decorator sets (``has_gate``, ``has_bias``, ``is_transposed``,
    ``is_concatenated``), or ``None`` when ``module`` is not one. Needs no transformers import."""
    flags = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return None
    if getattr(module, "has_post_expert_norm", False):
        return None  # a norm over each expert's output: not a layout a style can split
    transposed = module.is_transposed
    up_hidden, down_hidden = (2, 1) if transposed else (1, 2)
    up = "gate_up_proj" if module.has_gate else "up_proj"
    fused = ("concat" if module.is_concatenated else "interleave") if module.has_gate else None
    weights = [ExpertWeight(up, hidden_dim=up_hidden, fused=fused), ExpertWeight("down_proj", hidden_dim=down_hidden)]
    if module.has_bias:
        weights += [ExpertWeight(f"{up}_bias", hidden_dim=1, fused=fused),
                    ExpertWeight("down_proj_bias", output_bias=True)]
    return ExpertsLayout(weights=tuple(weights), call="top_k", expert_count_attrs=("num_experts",))


def layout_of(module) -> ExpertsLayout | None:
    """The preset layout of a recognised experts module, else ``None``: this project's and torchtitan's
    ``GroupedExperts`` (by their parameter names), transformers' experts modules (by the decorator's attributes)."""
    names = set(_own_parameters(module))
    for preset in (GROUPED_EXPERTS, TORCHTITAN_GROUPED_EXPERTS):
        if names == set(preset.names):
            return preset
    return transformers_layout(module)
