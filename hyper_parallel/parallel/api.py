"""``parallelize_module``: apply parallel styles to a module tree by fully-qualified-name patterns."""

from __future__ import annotations

import fnmatch

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.parallel.style import ParallelStyle

__all__ = ["parallelize_module"]


def parallelize_module(module, device_mesh: DeviceMesh, parallelize_plan):
    """Apply ``parallelize_plan`` to ``module`` in place and return it.

    Args:
        parallelize_plan: a :class:`ParallelStyle` for ``module`` itself, or a dict mapping fully-qualified
            submodule names to styles. Names may use ``fnmatch`` wildcards (``"layers.*.mlp.w1"``); every
            pattern must match at least one submodule.

    Raises:
        ValueError: a pattern matches no submodule (the message lists the module's names).
        TypeError: a plan entry that is not a ParallelStyle.

    >>> parallelize_module(mlp, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})  # doctest: +SKIP
    """
    if isinstance(parallelize_plan, ParallelStyle):
        return parallelize_plan.apply(module, device_mesh)
    if not isinstance(parallelize_plan, dict):
        raise TypeError(f"parallelize_plan must be a ParallelStyle or a dict of name -> ParallelStyle, "
                        f"got {type(parallelize_plan).__name__}")
    named = [(n, m) for n, m in get_platform().named_modules(module) if n]
    for pattern, style in parallelize_plan.items():
        if not isinstance(style, ParallelStyle):
            raise TypeError(f"plan entry {pattern!r} must be a ParallelStyle, got {type(style).__name__}")
        matches = [m for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise ValueError(f"plan pattern {pattern!r} matches no submodule; submodules: {[n for n, _ in named]}")
        for sub in matches:
            style.apply(sub, device_mesh)
    return module
