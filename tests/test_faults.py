"""Issue 11's faults, on every backend at 2 and 4 ranks: no hang, the same clear error on every rank, the world
survives."""

from __future__ import annotations

import pytest

from tests.cases import fault_cases as fc


@pytest.mark.parametrize("nan_router", [False, True], ids=["starved", "nan_router"])
@pytest.mark.parametrize("nproc", [2, 4])
def test_training_step_with_starved_ranks_and_no_input_grad(worlds, backend, nproc, nan_router):
    worlds.run(backend, nproc, fc.starved_step_matches_single_device, nan_router, timeout_s=60)


BAD_INPUT = {
    "sum": "rank 1: num_tokens_per_expert sums to {s} but routed_input has {g} rows",
    "length": "rank 1: num_tokens_per_expert must have one entry per expert ({g}), got {l} entries",
    "negative": "rank 1: num_tokens_per_expert has negative entries",
    "float_counts": "rank 1: num_tokens_per_expert must be an integer tensor (['int32', 'int64']), got float32",
    "hidden": "rank 1: routed_input rows have 7 values, rank 0's have 6",
    "dtype": "rank 1: routed_input is bfloat16, rank 0's is float32",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUT))
@pytest.mark.parametrize("nproc", [2, 4])
def test_a_bad_dispatch_input_on_one_rank_raises_on_every_rank(worlds, backend, nproc, kind):
    messages = worlds.run(backend, nproc, fc.one_rank_sends_bad_input, kind, timeout_s=60)
    g = 2 * nproc
    want = BAD_INPUT[kind].format(g=g, s=g + 2, l=g + 2)
    assert all(m == messages[0] for m in messages), messages  # the same error, on every rank
    assert want in messages[0], messages[0]
    assert messages[0].startswith(f"expert-parallel dispatch over ranks {list(range(nproc))}: ")


def test_experts_built_differently_are_refused_on_every_rank(worlds, backend):
    messages = worlds.run(backend, 2, fc.experts_built_differently, timeout_s=60)
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("ExpertParallel: the experts must be built the same on every rank of the mesh")
    assert "rank 0: w1 [4, 8, 6] float32" in messages[0] and "rank 1: w1 [6, 8, 6] float32" in messages[0]
