"""Reading and writing the state of the frameworks' own optimizers, per parameter, under one set of names.

Two kinds are recognised by their structure (no framework is imported here):

* a ``torch.optim`` optimizer (``param_groups``, ``state``, ``state_dict``/``load_state_dict``): every tensor of a
  parameter's state shaped like the parameter (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
  ``momentum_buffer``...) is laid out like the parameter; 0-d tensors and numbers (``step``) are scalars;
* MindSpore's ``nn.AdamWeightDecay`` (``moments1``, ``moments2``, ``global_step``): its moments are saved as
  ``exp_avg`` and ``exp_avg_sq`` and its global step as each parameter's ``step``, torch's names, so a checkpoint
  moves between the two.

The optimizer's hyperparameters (learning rate, betas, weight decay) are not part of the state: they stay those of
the optimizer ``load`` is given.
"""

from __future__ import annotations

import numpy as np

from hyper_parallel._select import get_platform

__all__ = ["optimizer_adapter"]


class _TorchStyle:
    """A ``torch.optim.Optimizer``: per-parameter state dicts."""

    description = "torch.optim optimizer"
    tensor_keys: frozenset | None = None  # any key
    scalar_keys: frozenset | None = None

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @staticmethod
    def matches(optimizer) -> bool:
        return (isinstance(getattr(optimizer, "param_groups", None), list) and hasattr(getattr(optimizer, "state",
                None), "get") and callable(getattr(optimizer, "load_state_dict", None)))

    def params(self) -> list:
        return [q for group in self.optimizer.param_groups for q in group["params"]]

    def read(self) -> dict[int, tuple[dict, dict]]:
        """``{position: (tensors by key, scalars by key)}`` for the parameters that have state."""
        p = get_platform()
        out = {}
        for pos, q in enumerate(self.params()):
            state = self.optimizer.state.get(q)
            if not state:
                continue
            tensors, scalars = {}, {}
            for key, value in state.items():
                if isinstance(value, p.Tensor):
                    if len(value.shape) and tuple(value.shape) == tuple(q.shape):
                        tensors[key] = value
                    elif not len(value.shape):
                        scalars[key] = _number(p.to_numpy(value))
                    else:
                        raise ValueError(f"checkpoint: optimizer state {key!r} has shape {list(value.shape)}, "
                                         f"neither the parameter's {list(q.shape)} nor a scalar; only those can be "
                                         "resharded")
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    scalars[key] = value
                else:
                    raise TypeError(f"checkpoint: optimizer state {key!r} is a {type(value).__name__}; supported: "
                                    "tensors shaped like the parameter, 0-d tensors and numbers")
            out[pos] = (tensors, scalars)
        return out

    def write(self, states: dict[int, tuple[dict, dict]]) -> None:
        """Replace the optimizer's state by ``states`` (tensors already on this rank's layout); parameters absent
        from ``states`` get no state (as before their first step)."""
        p = get_platform()
        sd = self.optimizer.state_dict()
        new_state = {}
        for pos, (tensors, scalars) in states.items():
            entry = dict(tensors)
            for key, value in scalars.items():
                # torch keeps a step as a float32 host tensor (an in-place counter)
                entry[key] = p.tensor(np.asarray(value, dtype=np.float32), dtype="float32", device="cpu")
            new_state[pos] = entry
        sd["state"] = new_state
        self.optimizer.load_state_dict(sd)  # casts each tensor to its parameter's dtype and device


class _MindSporeAdamWeightDecay:
    """MindSpore ``nn.AdamWeightDecay``: ``moments1``/``moments2`` aligned with its parameters, one global step."""

    description = "mindspore.nn.AdamWeightDecay"
    tensor_keys = frozenset({"exp_avg", "exp_avg_sq"})
    scalar_keys = frozenset({"step"})

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @staticmethod
    def matches(optimizer) -> bool:
        return all(hasattr(optimizer, a) for a in ("moments1", "moments2", "global_step", "_parameters"))

    def params(self) -> list:
        return list(self.optimizer._parameters)

    def read(self) -> dict[int, tuple[dict, dict]]:
        p = get_platform()
        step = _number(p.to_numpy(self.optimizer.global_step).reshape(-1)[0])
        return {pos: ({"exp_avg": self.optimizer.moments1[pos], "exp_avg_sq": self.optimizer.moments2[pos]},
                      {"step": step}) for pos in range(len(self.params()))}

    def write(self, states: dict[int, tuple[dict, dict]]) -> None:
        p = get_platform()
        steps = []
        for pos, (tensors, scalars) in states.items():
            if "exp_avg" in tensors:
                p.assign(self.optimizer.moments1[pos], tensors["exp_avg"])
            if "exp_avg_sq" in tensors:
                p.assign(self.optimizer.moments2[pos], tensors["exp_avg_sq"])
            if "step" in scalars:
                steps.append(scalars["step"])
        if steps:  # one step for all parameters: torch's may differ per parameter (one without gradients)
            gs = self.optimizer.global_step
            p.assign(gs, p.tensor(np.full(tuple(gs.shape), int(max(steps))), dtype=p.dtype_name(gs.dtype)))


_KINDS = (_TorchStyle, _MindSporeAdamWeightDecay)


def _number(a) -> int | float:
    value = float(np.asarray(a).reshape(()))
    return int(value) if value.is_integer() else value


def optimizer_adapter(optimizer):
    """The adapter for ``optimizer``.

    Raises:
        TypeError: an optimizer of neither supported kind.
    """
    for kind in _KINDS:
        if kind.matches(optimizer):
            return kind(optimizer)
    raise TypeError(f"checkpoint: cannot read the state of a {type(optimizer).__module__}."
                    f"{type(optimizer).__name__}; supported: {[k.description for k in _KINDS]}")
