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


def test_etp_tp_line_with_different_tokens_is_detected_in_check_mode(worlds, backend):
    messages = worlds.run(backend, 4, fc.etp_tp_line_with_different_tokens, timeout_s=60)
    assert all(m == messages[0] for m in messages), messages
    assert messages[0].startswith("ExpertTensorParallel needs the same routed tokens on every rank of a tp line")
    assert "rank 0: 4 rows" in messages[0] and "rank 2" not in messages[0], messages[0]


DISAGREEMENTS = {
    "splits": "rank 0 sends 2 rows to rank 1, which expects 1",
    "dtype": "rank 1 sends int32 where rank 0 sends float32",
    "collective": "rank 1 calls broadcast where rank 0 calls all_reduce",
    "shape": "rank 1's tensor has 2 dims, 3 rows of 3 values; rank 0's 2 dims, 2 rows of 3",
}


@pytest.mark.parametrize("kind", sorted(DISAGREEMENTS))
@pytest.mark.parametrize("nproc", [2, 4])
def test_disagreeing_collectives_raise_everywhere_in_check_mode(worlds, backend, nproc, kind):
    messages = worlds.run(backend, nproc, fc.disagreeing_collective, kind, timeout_s=60)
    assert all(m == messages[0] for m in messages), messages
    assert messages[0].startswith(f"HYPER_PARALLEL_CHECK_COLLECTIVES=1: the ranks of group {list(range(nproc))} "
                                  "disagree on a collective: ")
    assert DISAGREEMENTS[kind] in messages[0], messages[0]


@pytest.mark.parametrize("nproc", [2, 4])
def test_tokens_of_another_dtype_than_the_experts_fail_on_every_rank(worlds, backend, nproc):
    messages = worlds.run(backend, nproc, fc.tokens_of_another_dtype_than_the_experts, timeout_s=60)
    assert all(m == "GroupedExperts: the routed tokens are float16 but the experts' weights are float32; cast the "
                    "tokens or the layer so they match" for m in messages), messages
