"""hyper_parallel: Mixture-of-Experts parallelism on one framework-neutral core, for PyTorch and MindSpore.

Importing this package imports no deep-learning framework; the backend is resolved on the first call to
:func:`get_platform` (see ``HYPER_PARALLEL_PLATFORM``).
"""

from hyper_parallel._select import ENV_VAR, available_backends, get_platform
from hyper_parallel.platform import Group, Handle, Platform

__version__ = "0.1.0"

__all__ = ["ENV_VAR", "Group", "Handle", "Platform", "available_backends", "get_platform", "__version__"]
