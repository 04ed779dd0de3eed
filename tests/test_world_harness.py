"""Tests of the test harness itself: :class:`hyper_parallel.testing.World` on torch CPU/gloo with 2 ranks.

The conformance suite trusts the harness to report a failing case with its rank and traceback, to turn a hung
collective into :class:`WorldTimeout` instead of hanging the run, and to hand the next case a working world. These
tests check exactly that, with the cases in :mod:`tests.cases.harness_cases`.

Starting a world costs a few seconds and stopping a hung one about 20 s (``World.stop`` first waits for a graceful
exit), so one module-scoped world is shared and the tests run in file order; each test leaves it usable.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from hyper_parallel.testing import RankError, World, WorldTimeout
from tests.cases import harness_cases as h
from tests.processes import assert_all_gone, is_running

NPROC = 2

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def world():
    w = World("torch", NPROC)
    w.start()
    yield w
    w.stop()


def _gone(pids: list[int], within_s: float = 5.0) -> None:
    assert_all_gone(pids, within_s, what="worker processes still running after stop()")


def _wait_until_dead(w: World, within_s: float = 10.0) -> None:
    """Wait until ``w.alive`` turns False (a worker that died is reaped a few ms after its socket closes)."""
    deadline = time.monotonic() + within_s
    while w.alive:
        assert time.monotonic() < deadline, "a dead worker still counts as alive"
        time.sleep(0.01)


def _assert_healthy(w: World) -> None:
    """The world runs a plain case and a collective correctly."""
    assert w.run(h.ok, 3) == [(r, 6) for r in range(NPROC)]
    assert w.run(h.rank_sum) == [float(sum(range(NPROC)))] * NPROC


# ---------------------------------------------------------------- results
def test_alive_is_false_before_start():
    assert World("torch", NPROC).alive is False


def test_run_returns_per_rank_results_in_rank_order(world):
    assert world.alive
    assert world.run(h.ok, 21) == [(0, 42), (1, 42)]
    assert world.run(h.with_kwargs, "a", b={"k": [1]}) == [(0, "a", {"k": [1]}), (1, "a", {"k": [1]})]
    assert world.run(h.rank_sum) == [1.0, 1.0]
    pids = world.run(h.pid)
    assert len(set(pids)) == NPROC and os.getpid() not in pids  # one separate process per rank


# ---------------------------------------------------------------- a case that raises
def test_rank_error_names_the_rank_and_keeps_the_world(world):
    pids = world.run(h.pid)
    with pytest.raises(RankError) as excinfo:
        world.run(h.raise_on_rank, 1)
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, AssertionError)  # pytest reports it as a test failure, not an error
    assert msg.startswith("raise_on_rank failed on torch x2:\n--- rank 1 ---\nTraceback (most recent call last):")
    assert 'raise ValueError(f"boom on rank {r}")' in msg  # the worker's real traceback, source line included
    assert msg.rstrip().endswith("ValueError: boom on rank 1")
    assert "--- rank 0 ---" not in msg  # rank 0 returned normally
    assert "did not answer" not in msg
    # Every rank answered, so the world was kept: same processes, still correct.
    assert world.alive
    assert world.run(h.pid) == pids
    _assert_healthy(world)


# ---------------------------------------------------------------- a hung collective
def test_hung_collective_raises_world_timeout_and_next_run_restarts(world):
    old_pids = world.run(h.pid)
    start = time.monotonic()
    with pytest.raises(WorldTimeout, match=re.escape(
            "hang_on_rank on torch x2: ranks [1] did not answer within 5 s (a hung collective?); the world was "
            "stopped")):
        world.run(h.hang_on_rank, 1, timeout_s=5)
    elapsed = time.monotonic() - start
    assert elapsed >= 5  # the timeout was honoured, not cut short...
    assert elapsed < 60  # ...and the hung rank was killed (stop() waits up to ~22 s before SIGKILL)
    assert not world.alive
    _gone(old_pids)
    # The next run starts a fresh world transparently, with a working process group.
    _assert_healthy(world)
    new_pids = world.run(h.pid)
    assert world.alive and not set(new_pids) & set(old_pids)


# ---------------------------------------------------------------- a worker that dies
def test_dead_worker_is_reported_and_replaced(world):
    old_pids = world.run(h.pid)
    with pytest.raises(RankError) as excinfo:
        world.run(h.exit_on_rank, 1)
    msg = str(excinfo.value)
    assert "--- rank 1 ---\nworker process exited:" in msg
    assert "--- rank 0 ---" not in msg
    # See test_run_right_after_a_worker_died: the harness only notices the death once the process is reaped.
    _wait_until_dead(world)
    _gone([old_pids[1]])
    _assert_healthy(world)
    new_pids = world.run(h.pid)
    assert new_pids[1] != old_pids[1]


def test_run_right_after_a_worker_died(world):
    # lingering_exit_on_rank closes the worker's connection and only dies 1.5 s later: the same state as the few ms
    # between a crashing worker's socket closing and its process being reaped, made wide enough to be deterministic.
    with pytest.raises(RankError, match="worker process exited"):
        world.run(h.lingering_exit_on_rank, 1, 1.5)
    try:
        # The dead worker's world was stopped, so the next case runs on a fresh world.
        assert world.run(h.ok, 1) == [(0, 2), (1, 2)]
    finally:
        _assert_healthy(world)  # leave a working world behind for the tests that follow


# ---------------------------------------------------------------- start-up failure
def test_start_failure_raises_world_timeout_with_worker_output():
    # An unknown backend makes every worker die during start-up, before importing any framework (fast).
    w = World("no_such_backend", NPROC, start_timeout_s=60)
    with pytest.raises(WorldTimeout) as excinfo:
        w.start()
    msg = str(excinfo.value)
    assert msg.startswith("no_such_backend world of 2 ranks did not start within 60 s (or a rank died)")
    assert "HYPER_PARALLEL_PLATFORM='no_such_backend' is not a known backend" in msg  # the worker's own error
    assert not w.alive


# ---------------------------------------------------------------- lifecycle
def test_context_manager_starts_and_stops_leaving_no_workers():
    with World("torch", NPROC) as w:
        assert w.alive
        pids = w.run(h.pid)
        assert all(is_running(p) for p in pids)
        assert w.run(h.ok, 5) == [(0, 10), (1, 10)]
    assert not w.alive
    _gone(pids, within_s=0.5)  # stop() waits for its workers: they are gone, not just dying
    w.stop()  # stopping a stopped world is a no-op
    assert not w.alive
