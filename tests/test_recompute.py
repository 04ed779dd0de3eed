"""Activation checkpointing of an expert-parallel MoE layer: same gradients, side effects once per step."""

from __future__ import annotations

import pytest

from tests.cases import recompute_cases as rc


@pytest.mark.parametrize("nproc", [1, 2])
def test_recomputed_layer_matches_and_counts_once(worlds, backend, nproc):
    """torch: checkpoint(layer, x) with the loss tracker; MindSpore: layer.recompute() (without the tracker)."""
    worlds.run(backend, nproc, rc.recompute_matches, "layer")


@pytest.mark.backends("mindspore")
@pytest.mark.parametrize("nproc", [1, 2])
def test_recomputed_experts_with_the_loss_tracker(worlds, backend, nproc):
    """MindSpore's pattern for the loss tracker: recompute the routed experts only."""
    worlds.run(backend, nproc, rc.recompute_matches, "experts")


@pytest.mark.backends("mindspore")
def test_loss_tracker_in_a_recomputed_cell_is_refused(worlds, backend):
    worlds.run(backend, 2, rc.tracker_in_a_recomputed_cell_is_refused)
