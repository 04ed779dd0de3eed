"""Shared worlds per backend, chosen by parametrization so every failure names its backend.

``HYPER_PARALLEL_TEST_BACKENDS`` (comma-separated; default ``torch,mindspore``) picks the backends. A listed backend
whose framework is missing FAILS the run instead of silently testing nothing. ``torch`` also brings
``torch_npu_logic_on_gloo``: the NPU adapter's logic on CPU/gloo.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from hyper_parallel.testing import World

KNOWN = {"torch": "torch", "mindspore": "mindspore"}
NPU_ON_GLOO = "torch_npu_logic_on_gloo"


def selected_backends() -> list[str]:
    raw = os.environ.get("HYPER_PARALLEL_TEST_BACKENDS", "torch,mindspore")
    names = [b.strip().lower() for b in raw.split(",") if b.strip()]
    bad = [b for b in names if b not in KNOWN]
    if not names or bad:
        raise pytest.UsageError(f"HYPER_PARALLEL_TEST_BACKENDS={raw!r}: unknown {bad}; valid: {sorted(KNOWN)}")
    missing = [b for b in names if importlib.util.find_spec(KNOWN[b]) is None]
    if missing:
        raise pytest.UsageError(f"HYPER_PARALLEL_TEST_BACKENDS lists {missing} but they are not installed")
    out = []
    for b in names:
        out.append(b)
        if b == "torch":
            out.append(NPU_ON_GLOO)
    return out


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        backends = selected_backends()
        marker = metafunc.definition.get_closest_marker("backends")
        if marker is not None:
            backends = [b for b in backends if b in marker.args]
        metafunc.parametrize("backend", backends)


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): restrict a test to these backends")


class Worlds:
    """Session pool: one :class:`World` per (backend, nproc), started on first use."""

    def __init__(self) -> None:
        self._worlds: dict[tuple[str, int], World] = {}

    def get(self, backend: str, nproc: int) -> World:
        key = (backend, nproc)
        if key not in self._worlds:
            if backend == NPU_ON_GLOO:
                world = World("torch", nproc, platform_class="tests.cases.npu_on_gloo:TorchNpuLogicOnGloo")
            else:
                world = World(backend, nproc)
            world.start()
            self._worlds[key] = world
        return self._worlds[key]

    def run(self, backend: str, nproc: int, fn, *args, **kwargs) -> list:
        return self.get(backend, nproc).run(fn, *args, **kwargs)

    def stop(self) -> None:
        for world in self._worlds.values():
            world.stop()


@pytest.fixture(scope="session")
def worlds():
    pool = Worlds()
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def torch_in_process():
    """Run this module's in-process checks on the torch platform (MindSpore runs the same cases in its worlds:
    one framework per process)."""
    pytest.importorskip("torch")
    import hyper_parallel._select as select

    old = os.environ.get(select.ENV_VAR)
    os.environ[select.ENV_VAR] = "torch"
    select._reset_platform_for_tests()
    yield
    select._reset_platform_for_tests()
    if old is None:
        os.environ.pop(select.ENV_VAR)
    else:
        os.environ[select.ENV_VAR] = old
