"""The MoE layer (router + experts + shared experts) parallelized with every style, on every backend."""

from __future__ import annotations

import pytest

from tests.cases import moe_cases as mc

VARIANTS = ["plain", "shared", "skewed"]


@pytest.mark.parametrize("variant", VARIANTS + ["capacity"])
@pytest.mark.parametrize("nproc", [2, 4])
def test_moe_expert_parallel(worlds, backend, nproc, variant):
    worlds.run(backend, nproc, mc.moe_matches_single_device, "ep", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_tensor_parallel(worlds, backend, variant):
    worlds.run(backend, 2, mc.moe_matches_single_device, "tp", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_expert_tensor_parallel_2x2(worlds, backend, variant):
    worlds.run(backend, 4, mc.moe_matches_single_device, "etp", variant)


@pytest.mark.parametrize("nproc", [2, 4])
def test_moe_reorderer_sequence_parallel_uneven_tokens(worlds, backend, nproc):
    worlds.run(backend, nproc, mc.moe_matches_single_device, "sp", "shared")


def test_wrong_model_dimension_is_refused(worlds, backend):
    assert worlds.run(backend, 2, mc.wrong_model_dimension_is_refused) == [4, 4]


def test_expert_bias_update_and_batched_aux_loss(worlds, backend):
    worlds.run(backend, 2, mc.bias_update_and_aux_loss)


@pytest.mark.backends("torch")
def test_torch_compile_matches_eager(worlds, backend):
    assert worlds.run(backend, 2, mc.compiled_matches_eager) == [8, 8]
