"""Parallel styles and ``parallelize_module``."""

from hyper_parallel.parallel.api import parallelize_module
from hyper_parallel.parallel.style import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
)

__all__ = ["ColwiseParallel", "ParallelStyle", "PrepareModuleInput", "PrepareModuleOutput", "RowwiseParallel",
           "parallelize_module"]
