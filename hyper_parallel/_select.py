"""Choosing the backend: ``HYPER_PARALLEL_PLATFORM``, auto-detection, and third-party adapters.

Resolution, done once per process and cached by :func:`get_platform`:

1. ``HYPER_PARALLEL_PLATFORM`` (case-insensitive) names the backend, if set and non-empty.
2. Otherwise the first installed framework in :data:`AUTO_DETECT_ORDER` wins: ``torch_npu`` (an Ascend host with
   torch_npu wants the NPU), then ``torch``, then ``mindspore``. Detection looks for the framework's package
   without importing it.
3. Third-party adapters register under the entry-point group :data:`ENTRY_POINT_GROUP`; the entry point's name is
   the backend name and its object a :class:`~hyper_parallel.platform.Platform` subclass. They can be selected by
   name; they are never auto-detected.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import threading

ENV_VAR = "HYPER_PARALLEL_PLATFORM"
ENTRY_POINT_GROUP = "hyper_parallel.platforms"


@dataclasses.dataclass(frozen=True)
class _Builtin:
    module: str
    cls: str
    framework: str
    install: str


BUILTIN = {
    "torch": _Builtin("platform_adapters.torch", "TorchPlatform", "torch", "pip install 'hyper-parallel[torch]'"),
    "torch_npu": _Builtin("platform_adapters.torch_npu", "TorchNpuPlatform", "torch_npu",
                          "pip install 'torch>=2.4' torch-npu (matching your CANN version)"),
    "mindspore": _Builtin("platform_adapters.mindspore", "MindSporePlatform", "mindspore",
                          "pip install 'hyper-parallel[mindspore]'"),
}
AUTO_DETECT_ORDER = ("torch_npu", "torch", "mindspore")

_lock = threading.Lock()
_cached = None


def _entry_points() -> dict:
    return {ep.name.lower(): ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> dict[str, bool]:
    """Every known backend name mapped to whether its framework is installed (nothing is imported)."""
    found = {name: importlib.util.find_spec(b.framework) is not None for name, b in BUILTIN.items()}
    for name in _entry_points():
        found.setdefault(name, True)
    return found


def resolve_backend_name(value: str | None = None) -> str:
    """The backend name that :func:`get_platform` would load (``value`` defaults to the env var).

    Raises:
        ValueError: unknown name (lists the valid ones) or, when auto-detecting, no framework installed.
    """
    value = os.environ.get(ENV_VAR, "") if value is None else value
    name = value.strip().lower()
    if name:
        valid = sorted(set(BUILTIN) | set(_entry_points()))
        if name not in valid:
            raise ValueError(f"{ENV_VAR}={value!r} is not a known backend; valid values: {valid}")
        return name
    for candidate in AUTO_DETECT_ORDER:
        if importlib.util.find_spec(BUILTIN[candidate].framework) is not None:
            return candidate
    raise ValueError(
        f"{ENV_VAR} is unset and no supported framework is installed; install one of: "
        + "; ".join(f"{n}: {b.install}" for n, b in BUILTIN.items())
    )


def load_platform_class(name: str) -> type:
    """Import and return the Platform subclass registered for ``name`` (a resolved backend name).

    Raises:
        ImportError: the framework is missing; the message says which pip install fixes it.
    """
    if name in BUILTIN:
        spec = BUILTIN[name]
        if importlib.util.find_spec(spec.framework) is None:
            raise ImportError(
                f"backend {name!r} needs the {spec.framework!r} package, which is not installed; fix: {spec.install}"
            )
        return getattr(importlib.import_module(spec.module), spec.cls)
    return _entry_points()[name].load()


def get_platform():
    """The :class:`~hyper_parallel.platform.Platform` of this process, created on first call and cached.

    >>> import os; os.environ["HYPER_PARALLEL_PLATFORM"] = "torch"   # doctest: +SKIP
    >>> get_platform().name                                           # doctest: +SKIP
    'torch'
    """
    global _cached
    if _cached is None:
        with _lock:
            if _cached is None:
                _cached = load_platform_class(resolve_backend_name())()
    return _cached


def _reset_platform_for_tests(platform=None) -> None:
    """Drop (or replace) the cached platform. For tests only."""
    global _cached
    _cached = platform
