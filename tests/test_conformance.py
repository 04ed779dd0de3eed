"""The conformance suite: every contract member, on every backend that can run here, at 2 and 4 ranks."""

from __future__ import annotations

import pytest

from tests.cases import collectives as c
from tests.cases import errors as e

NPROCS = [2, 4]
DTYPES = ["int64", "float32", "bfloat16"]


@pytest.mark.parametrize("nproc", NPROCS)
def test_identity_and_world(worlds, backend, nproc):
    results = worlds.run(backend, nproc, c.identity)
    assert results == [(r, nproc, r, nproc, list(range(nproc))) for r in range(nproc)]


@pytest.mark.parametrize("nproc", NPROCS)
def test_barrier_really_blocks(worlds, backend, nproc):
    worlds.run(backend, nproc, c.barrier_blocks)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nproc", NPROCS)
def test_all_reduce(worlds, backend, nproc, dtype):
    worlds.run(backend, nproc, c.all_reduce, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nproc", NPROCS)
def test_all_gather_into_tensor(worlds, backend, nproc, dtype):
    worlds.run(backend, nproc, c.all_gather, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nproc", NPROCS)
def test_reduce_scatter_tensor(worlds, backend, nproc, dtype):
    worlds.run(backend, nproc, c.reduce_scatter, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nproc", NPROCS)
def test_broadcast(worlds, backend, nproc, dtype):
    worlds.run(backend, nproc, c.broadcast, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", c.SPLIT_PATTERNS)
@pytest.mark.parametrize("nproc", NPROCS)
def test_all_to_all_single(worlds, backend, nproc, pattern, dtype):
    received = worlds.run(backend, nproc, c.all_to_all, pattern, dtype)
    assert sum(received) == c.split_matrix(pattern, nproc).sum()


@pytest.mark.parametrize("pattern", ["uneven", "partly_zero"])
@pytest.mark.parametrize("nproc", NPROCS)
def test_all_to_all_single_async(worlds, backend, nproc, pattern):
    worlds.run(backend, nproc, c.all_to_all, pattern, "float32", async_op=True)


def test_groups_of_a_2x2_mesh(worlds, backend):
    worlds.run(backend, 4, c.mesh_groups_2x2)


@pytest.mark.parametrize("nproc", NPROCS)
def test_differentiable_collective_gradients(worlds, backend, nproc):
    worlds.run(backend, nproc, c.gradients)


@pytest.mark.parametrize(
    "case", [c.factories, c.count_calls, c.value_and_grad_with_params, c.hooks, c.manual_seed],
    ids=lambda f: f.__name__)
@pytest.mark.parametrize("nproc", NPROCS)
def test_local_members(worlds, backend, nproc, case):
    worlds.run(backend, nproc, case)


@pytest.mark.parametrize("case", [e.bad_splits, e.bad_arguments], ids=lambda f: f.__name__)
@pytest.mark.parametrize("nproc", NPROCS)
def test_bad_input_raises_and_world_survives(worlds, backend, nproc, case):
    worlds.run(backend, nproc, case)
    worlds.run(backend, nproc, c.all_reduce, "float32")  # nothing half-sent: the world still works


def test_collective_on_a_group_without_the_caller(worlds, backend):
    worlds.run(backend, 4, e.not_a_member)
