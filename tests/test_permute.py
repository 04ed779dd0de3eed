"""The rank-major -> expert-major permutation: worked examples, property tests, and every backend."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cases import permute_cases as pc

pytestmark = pytest.mark.usefixtures("torch_in_process")


def test_worked_example_two_ranks_two_experts():
    # rank0 sends 1 row for e0 and 2 for e1; rank1 sends 3 for e0 and none for e1.
    # rank-major rows: [r0e0: 0][r0e1: 1 2][r1e0: 3 4 5]  ->  expert-major: e0 = 0 3 4 5, e1 = 1 2
    assert pc.reference([1, 2, 3, 0], 2, 2, 1) == [0, 3, 4, 5, 1, 2]
    pc.check([1, 2, 3, 0], 2, 2, 1)


def test_worked_example_with_alignment():
    # align 8: e0 holds 4 rows + 4 pads, e1 holds 2 rows + 6 pads; pads read row T=6 (the zero row)
    assert pc.reference([1, 2, 3, 0], 2, 2, 8) == [0, 3, 4, 5, 6, 6, 6, 6, 1, 2] + [6] * 6
    pc.check([1, 2, 3, 0], 2, 2, 8)


@pytest.mark.parametrize("counts,R,E", [([0], 1, 1), ([5], 1, 1), ([0, 0, 0, 0], 2, 2), ([0, 4], 2, 1),
                                        ([3, 0, 0, 2, 0, 1], 1, 6)],
                         ids=["zero-tokens", "one-rank-one-expert", "all-empty", "one-expert", "one-rank"])
@pytest.mark.parametrize("align", [1, 8, 16, 32])
def test_edge_cases(counts, R, E, align):
    pc.check(counts, R, E, align)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4).flatmap(lambda R: st.integers(1, 4).flatmap(
    lambda E: st.tuples(st.just(R), st.just(E), st.lists(st.integers(0, 9), min_size=R * E, max_size=R * E)))),
    st.sampled_from([1, 8, 16, 32]))
def test_matches_brute_force(case, align):
    R, E, counts = case
    pc.check(counts, R, E, align)


@pytest.mark.parametrize("counts,match", [([1, 2, 3], r"num_ranks \* num_local_experts = 2 \* 2 = 4 entries"),
                                          ([1, -2, 3, 0], r"non-negative, got \[1, -2, 3, 0\]")])
def test_bad_counts(counts, match):
    from hyper_parallel import get_platform
    from hyper_parallel.expert_parallel.permute import build_permute_indices

    with pytest.raises(ValueError, match=match):
        build_permute_indices(get_platform().tensor([0], dtype="int64"), counts, 2, 2)


def test_bad_alignment():
    from hyper_parallel import get_platform
    from hyper_parallel.expert_parallel.permute import build_permute_indices

    with pytest.raises(ValueError, match=r"align must be one of \[1, 8, 16, 32\], got 4"):
        build_permute_indices(get_platform().tensor([1], dtype="int64"), [1], 1, 1, align=4)


@pytest.mark.backends("mindspore", "torch")
def test_random_sweep_on_every_backend(worlds, backend):
    assert worlds.run(backend, 2, pc.random_sweep, 7) == [40, 40]


def test_zero_tokens_stay_connected_in_process():
    assert pc.zero_tokens_stay_connected()


@pytest.mark.backends("mindspore", "torch")
def test_zero_tokens_stay_connected_on_every_backend(worlds, backend):
    worlds.run(backend, 2, pc.zero_tokens_stay_connected)
