"""One definition of a layer for every framework.

A MoE layer class is written once, as a function of the framework's module base class (``torch.nn.Module`` or
MindSpore ``nn.Cell``); :func:`layer_class` builds it for the active platform on first use and caches it. Inside,
``forward`` is the computation and ``construct`` (MindSpore's name for it) is the same function.
"""

from __future__ import annotations

from typing import Callable

from hyper_parallel._select import get_platform

_BUILT: dict[tuple[str, str], type] = {}


def layer_class(define: Callable[[type], type]) -> type:
    """The class ``define(Module)`` for the active platform's ``Module``, built once per (platform, definition)."""
    p = get_platform()
    key = (p.name, f"{define.__module__}.{define.__qualname__}")
    if key not in _BUILT:
        cls = define(p.Module)
        cls.construct = cls.forward
        _BUILT[key] = cls
    return _BUILT[key]


def init_normal(shape, std: float, seed: int | None, offset: int = 0):
    """A float32 tensor of N(0, std^2) values from NumPy's seeded generator: the same numbers on every framework,
    so a model built on torch and on MindSpore with one seed starts identical."""
    import numpy as np  # only layers need NumPy; importing hyper_parallel does not

    rng = np.random.default_rng(None if seed is None else (seed, offset))
    return get_platform().tensor(rng.standard_normal(tuple(shape)).astype(np.float32) * std, dtype="float32")
