"""Parallel styles and ``parallelize_module``."""

from hyper_parallel.parallel.api import parallelize_module
from hyper_parallel.parallel.clip import clip_grad_norm_, clip_grads, total_grad_norm
from hyper_parallel.parallel.data_parallel import DataParallel, reduce_gradients
from hyper_parallel.parallel.style import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
)

__all__ = ["ColwiseParallel", "DataParallel", "ParallelStyle", "PrepareModuleInput", "PrepareModuleOutput",
           "RowwiseParallel", "clip_grad_norm_", "clip_grads", "parallelize_module", "reduce_gradients",
           "total_grad_norm"]
