"""hyper_parallel: Mixture-of-Experts parallelism on one framework-neutral core, for PyTorch and MindSpore.

Importing this package imports no deep-learning framework; the backend is resolved on the first call to
:func:`get_platform` (see ``HYPER_PARALLEL_PLATFORM``).
"""

from hyper_parallel import log as _log
from hyper_parallel._select import ENV_VAR, available_backends, get_platform
from hyper_parallel.dtensor import (
    DeviceMesh,
    DTensor,
    ParameterSpec,
    Partial,
    Placement,
    Replicate,
    Shard,
    StridedShard,
    distribute_module,
    distribute_parameter,
    distribute_tensor,
    full_parameter,
    get_parameter_spec,
    init_device_mesh,
    named_parameter_specs,
)
from hyper_parallel.expert_parallel import (
    BaseExpertParallel,
    ExpertParallel,
    ExpertsLayout,
    ExpertTensorParallel,
    ExpertWeight,
    TensorParallel,
)
from hyper_parallel.parallel import (
    ColwiseParallel,
    DataParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    clip_grad_norm_,
    clip_grads,
    parallelize_module,
    reduce_gradients,
)
from hyper_parallel.platform import Group, Handle, Platform

try:  # HYPER_PARALLEL_LOG_LEVEL turns the library's log on in every process that imports it
    _log.configure_logging()
except ValueError as _e:
    import warnings

    warnings.warn(f"{_e}; logging stays off", RuntimeWarning, stacklevel=2)


def __getattr__(name: str):
    # hyper_parallel.checkpoint imports NumPy, which `import hyper_parallel` does not: loaded on first use
    if name == "checkpoint":
        import importlib

        return importlib.import_module("hyper_parallel.checkpoint")
    raise AttributeError(f"module 'hyper_parallel' has no attribute {name!r}")


__version__ = "0.1.0"  # the only place the version is written: pyproject.toml reads it (setuptools dynamic)

__all__ = [
    "BaseExpertParallel", "ExpertParallel", "ExpertTensorParallel", "TensorParallel", "ExpertsLayout", "ExpertWeight",
    "DataParallel", "clip_grad_norm_", "clip_grads", "reduce_gradients",
    "ENV_VAR", "ColwiseParallel", "DTensor", "DeviceMesh", "Group", "Handle", "ParallelStyle", "ParameterSpec",
    "Partial", "Placement", "Platform", "PrepareModuleInput", "PrepareModuleOutput", "Replicate", "RowwiseParallel",
    "Shard", "StridedShard", "available_backends", "distribute_module", "distribute_parameter", "distribute_tensor",
    "full_parameter", "get_parameter_spec", "get_platform", "init_device_mesh", "named_parameter_specs",
    "parallelize_module", "checkpoint", "__version__",
]
