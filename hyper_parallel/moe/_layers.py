"""Which framework's layer classes the active platform uses, and the seeded initialisation they share.

Every layer is written once, as a framework-neutral mixin (``MoEMixin``, ``GroupedExpertsMixin`` ...); the classes
users instantiate are declared in one small module per framework, :mod:`hyper_parallel.moe.torch` and
:mod:`hyper_parallel.moe.mindspore`: each is the mixin plus the framework's module base, a real module-level class
(it pickles, and tracebacks and ``repr`` show its name). ``hyper_parallel.moe.MoE`` resolves to the class of the
active platform's framework.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hyper_parallel._select import get_platform

#: The framework whose module base a platform's ``Module`` is (or derives from) -> its layer module.
LAYER_MODULES = {
    "torch.nn.modules.module.Module": "hyper_parallel.moe.torch",
    "mindspore.nn.cell.Cell": "hyper_parallel.moe.mindspore",
}


def framework_layers() -> ModuleType:
    """The layer module for the active platform's ``Module`` (imports that framework).

    Raises:
        TypeError: the platform's ``Module`` derives from none of the supported framework bases.
    """
    module_base = get_platform().Module
    for cls in module_base.__mro__:
        path = LAYER_MODULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if path is not None:
            return importlib.import_module(path)
    raise TypeError(f"hyper_parallel.moe has layer classes for {sorted(LAYER_MODULES)}; the active platform's Module "
                    f"is {module_base.__module__}.{module_base.__qualname__}, which derives from none of them. "
                    "Declare the classes for it as hyper_parallel/moe/torch.py does (the mixin plus your base).")


def init_normal(shape, std: float, seed: int | None, offset: int = 0):
    """A float32 tensor of N(0, std^2) values from NumPy's seeded generator: the same numbers on every framework,
    so a model built on torch and on MindSpore with one seed starts identical."""
    import numpy as np  # only layers need NumPy; importing hyper_parallel does not

    rng = np.random.default_rng(None if seed is None else (seed, offset))
    return get_platform().tensor(rng.standard_normal(tuple(shape)).astype(np.float32) * std, dtype="float32")
