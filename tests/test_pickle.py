"""MoE models survive pickle, copy.deepcopy and torch.save, parallelized or not, on every backend."""

from __future__ import annotations

import pickle

import pytest

from tests.cases import pickle_cases as pc


@pytest.mark.parametrize("nproc,style", [(2, "none"), (2, "ep+sp"), (4, "ep+sp"), (4, "etp")])
def test_moe_round_trips(worlds, backend, nproc, style):
    worlds.run(backend, nproc, pc.round_trips_compute_the_same, style)


@pytest.mark.backends("torch")
def test_loading_without_the_process_groups_fails_clearly(worlds, backend, torch_in_process):
    payload = worlds.run(backend, 2, pc.pickled_parallel_model)[0]
    with pytest.raises(RuntimeError, match=r"before init_process_group\(\)"):
        pickle.loads(payload)
