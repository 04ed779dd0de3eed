"""Third-party MoE models on this project's expert styles (issue 12): the six transformers 5.x families and
torchtitan 0.3.0's MoE through ``parallelize_experts`` / ``parallelize_moe`` at EP=2, EP=4, ETP 2x2 (and TP), each
data rank feeding different tokens, against the same model on one process fed all tokens: output, input gradient,
every expert-shard gradient and every replicated gradient. Also a whole Qwen3-MoE causal LM with its loss, ranks
that receive no tokens, gpt-oss's biases under tensor parallelism and every refusal's message.

Real third-party code, no mocks, torch/gloo only (both libraries are torch modules); the cases are in
tests/cases/third_party_cases.py. Several families run in one world call, to keep the file's time small on a 2-core
CI machine.
"""

from __future__ import annotations

import pytest

from tests.cases import third_party_cases as tc

pytestmark = pytest.mark.backends("torch")

STYLES = [("ep", 2), ("ep", 4), ("etp", 4)]  # ETP: a 2x2 mesh ("ep", "tp")
# A hung collective is the failure these cases guard against: fail in a minute rather than the harness' default.
HANG_S = 60


def _max_errors(per_rank: list[dict]) -> dict:
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


@pytest.mark.parametrize("style,nproc", STYLES + [("tp", 2)])
def test_transformers_families_match_one_process(worlds, backend, style, nproc):
    """All six families, each with the eager, grouped_mm and batched_mm experts implementations."""
    results = worlds.run(backend, nproc, tc.transformers_blocks_match_one_process, style, tc.FAMILIES, tc.IMPLS)
    assert sorted(results[0]) == sorted(f"{f}/{i}" for f in tc.FAMILIES for i in tc.IMPLS)
    for key in results[0]:
        errors = _max_errors([r[key] for r in results])
        print(f"{style}x{nproc} {key}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


@pytest.mark.parametrize("style,nproc", STYLES)
def test_torchtitan_moe_matches_one_process(worlds, backend, style, nproc):
    results = worlds.run(backend, nproc, tc.torchtitan_moe_matches_one_process, style)
    print(f"{style}x{nproc} torchtitan: {_max_errors(results)}")


def test_qwen3_moe_causal_lm_under_expert_parallel(worlds, backend):
    """A whole Qwen3MoeForCausalLM (2 MoE layers), LM loss with labels, EP=2: loss, logits and every gradient."""
    results = worlds.run(backend, 2, tc.qwen3_moe_causal_lm_matches_one_process)
    print(f"Qwen3MoeForCausalLM ep x2: {_max_errors(results)}")


@pytest.mark.parametrize("impl", tc.IMPLS)
@pytest.mark.parametrize("style,nproc", [("ep", 2), ("etp", 4)])
def test_transformers_experts_on_ranks_receiving_no_tokens(worlds, backend, style, nproc, impl):
    worlds.run(backend, nproc, tc.transformers_experts_with_empty_ranks, style, impl, timeout_s=HANG_S)


@pytest.mark.parametrize("style,nproc", [("ep", 2), ("etp", 4)])
def test_torchtitan_experts_on_ranks_receiving_no_tokens(worlds, backend, style, nproc):
    worlds.run(backend, nproc, tc.torchtitan_experts_with_empty_ranks, style, timeout_s=HANG_S)


@pytest.mark.parametrize("style,nproc", [("tp", 2), ("etp", 4)])
def test_gpt_oss_biases_count_once_under_tensor_parallelism(worlds, backend, style, nproc):
    results = worlds.run(backend, nproc, tc.gpt_oss_biases_count_once, style)
    print(f"gpt-oss biases {style}x{nproc}: {_max_errors(results)}")


def test_bad_inputs(worlds, backend):
    assert worlds.run(backend, 2, tc.bad_inputs) == [True, True]
