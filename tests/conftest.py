"""Shared worlds per backend, chosen by parametrization so every failure names its backend.

``HYPER_PARALLEL_TEST_BACKENDS`` (comma-separated, case-insensitive; default ``torch,mindspore``) picks the backends:
any name the backend selection accepts, i.e. the built-ins and the names registered under the entry-point group
``hyper_parallel.platforms`` (a third-party adapter). An unknown name, or a built-in whose framework is missing, FAILS
the run instead of silently testing nothing. ``torch`` also brings ``torch_npu_logic_on_gloo``: the NPU adapter's
logic on CPU/gloo.
"""

from __future__ import annotations

import os

import pytest

from hyper_parallel import _select
from hyper_parallel.testing import World

NPU_ON_GLOO = "torch_npu_logic_on_gloo"


def selected_backends() -> list[str]:
    """The backends named by ``HYPER_PARALLEL_TEST_BACKENDS``, plus ``torch_npu_logic_on_gloo`` after ``torch``.

    Raises:
        pytest.UsageError: empty list, unknown name (the valid ones are listed) or a framework not installed.
    """
    raw = os.environ.get("HYPER_PARALLEL_TEST_BACKENDS", "torch,mindspore")
    names = list(dict.fromkeys(b.strip().lower() for b in raw.split(",") if b.strip()))
    known = _select.available_backends()  # built-ins and entry-point names; nothing is imported
    bad = [b for b in names if b not in known]
    if not names or bad:
        raise pytest.UsageError(f"HYPER_PARALLEL_TEST_BACKENDS={raw!r}: unknown {bad}; valid: {sorted(known)} (the "
                                f"built-ins and the names registered under {_select.ENTRY_POINT_GROUP!r})")
    missing = [b for b in names if not known[b]]
    if missing:
        fixes = "; ".join(f"{b}: {_select.BUILTIN[b].install}" for b in missing)
        raise pytest.UsageError(f"HYPER_PARALLEL_TEST_BACKENDS lists {missing} but they are not installed; fix: "
                                f"{fixes}")
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
