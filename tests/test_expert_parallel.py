"""ExpertParallel, TensorParallel and ExpertTensorParallel equal the single-device experts on every backend."""

from __future__ import annotations

import pytest

from tests.cases import ep_cases as ep

PATTERNS = ["random", "empty_expert", "zero_rank", "receives_none"]
EP_CALLS = {"all_gather_into_tensor": 1, "all_to_all_single": 2, "host_sync": 1}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel(worlds, backend, nproc, pattern):
    calls = worlds.run(backend, nproc, ep.experts_match_single_device, "ep", pattern)
    # per dispatch: one counts all-gather (with the cross-rank checks) + one token all-to-all + one host sync;
    # combine: one all-to-all
    assert all(c == EP_CALLS for c in calls), calls


@pytest.mark.parametrize("pattern", ["random", "empty_expert"])
def test_tensor_parallel(worlds, backend, pattern):
    calls = worlds.run(backend, 2, ep.experts_match_single_device, "tp", pattern)
    assert all(c == {"all_reduce": 1, "host_sync": 1} for c in calls), calls  # counts to host once


@pytest.mark.parametrize("pattern", PATTERNS)
def test_expert_tensor_parallel_2x2(worlds, backend, pattern):
    calls = worlds.run(backend, 4, ep.experts_match_single_device, "etp", pattern)
    assert all(c == {**EP_CALLS, "all_reduce": 1} for c in calls), calls


def test_expert_parallel_on_a_submesh(worlds, backend):
    calls = worlds.run(backend, 4, ep.experts_match_single_device, "ep_submesh", "random")
    assert all(c == EP_CALLS for c in calls), calls


@pytest.mark.parametrize("style", ["ep", "etp"])
def test_one_style_object_serves_two_layers(worlds, backend, style):
    worlds.run(backend, 4, ep.experts_match_single_device, style, "random", two_layers=True)


def test_bad_configurations(worlds, backend):
    worlds.run(backend, 4, ep.bad_configs)
