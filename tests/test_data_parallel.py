"""DataParallel, the frameworks' AdamW and global-norm clipping equal one device, on every backend."""

from __future__ import annotations

import pytest

from tests.cases import data_parallel_cases as dc

# Per step: one flat all-reduce per bucket (dp_ep: the replicated parameters over (dp, ep) and the expert shards
# over dp; dp_tp: everything over dp; ep_tp: the replicated parameters over ep, the expert shards only scaled), the
# tensor-parallel output reduction of the forward, and clipping's all-reduce of the expert shards' squared norms
# over each axis they are split on. The backward reduction of the experts' replicated input is skipped on both
# frameworks: the tokens are data, and nothing before it needs a gradient. (MindSpore ran it while the routed rows'
# indices were framework ops hanging off the router's graph; on CPU they are host bookkeeping now, see
# Kernels.expert_counts / stable_order / convert.)
BUCKETS = {"dp_ep": 2, "dp_tp": 1, "ep_tp": 1}
TP_FORWARD = {"dp_ep": 0, "dp_tp": 1, "ep_tp": 1}
CLIP = {"dp_ep": 1, "dp_tp": 1, "ep_tp": 2}


@pytest.mark.parametrize("layout", ["dp_ep", "dp_tp", "ep_tp"])
def test_training_matches_one_device(worlds, backend, layout):
    calls = worlds.run(backend, 4, dc.trains_like_one_device, layout)
    want = BUCKETS[layout] + TP_FORWARD[layout] + CLIP[layout]
    assert all(c == {"all_reduce": want} for c in calls), calls


def test_bad_data_axes(worlds, backend):
    worlds.run(backend, 4, dc.bad_data_axes)


@pytest.mark.parametrize("nproc", [2, 4])
def test_global_load_balancing_loss(worlds, backend, nproc):
    worlds.run(backend, nproc, dc.global_aux_loss)


@pytest.mark.backends("torch")
def test_torch_fsdp2_with_expert_parallel(worlds, backend):
    """The Training page's FSDP2 recipe: dense parts fully_shard-ed over the data ranks, experts expert-parallel."""
    from tests.cases import fsdp_cases

    worlds.run(backend, 4, fsdp_cases.fsdp2_with_expert_parallel_trains_like_one_device)


@pytest.mark.backends("torch")
def test_accumulating_onto_reduced_gradients_is_refused(worlds, backend):
    assert all(worlds.run(backend, 4, dc.accumulating_onto_a_reduced_gradient_is_refused))
