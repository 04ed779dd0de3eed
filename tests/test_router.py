"""Router, token reorderer, load-balancing losses: worked examples in-process (torch), then every case against the
NumPy brute-force references on every backend (a 2-rank world, each rank with its own random draw)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cases import router_cases as rc

pytestmark = pytest.mark.usefixtures("torch_in_process")


def test_reorder_worked_example_ties_keep_token_order():
    # tokens 0..3, K=2. Expert 1 is chosen by tokens 0, 1, 3 (in that order, whatever the slot), expert 2 by none.
    sel = np.array([[1, 0], [3, 1], [0, 3], [1, 0]])
    scores = np.arange(8).reshape(4, 2) / 10
    out, tokens, counts, kept = rc.ref_reorder(scores, sel, 4)
    assert kept.tolist() == [1, 4, 7, 0, 3, 6, 2, 5]
    assert tokens.tolist() == [0, 2, 3, 0, 1, 3, 1, 2] and counts.tolist() == [3, 3, 0, 2]
    from hyper_parallel import get_platform
    from hyper_parallel.moe import TokenReorderer

    p = get_platform()
    got = TokenReorderer(num_experts=4, top_k=2)(rc._t(scores), rc._t(sel, "int64"))
    assert p.tolist(got[1]) == kept.tolist() and p.tolist(got[2]) == counts.tolist()
    assert [pair // 2 for pair in p.tolist(got[1])] == tokens.tolist()
    # a slice starting at token 10 of a longer sequence (ReordererSequenceParallel) reports global positions
    shifted = TokenReorderer(num_experts=4, top_k=2)(rc._t(scores), rc._t(sel, "int64"), 10)
    assert p.tolist(shifted[1]) == [pair + 20 for pair in kept.tolist()]
    np.testing.assert_allclose(p.tolist(got[0]), out, rtol=1e-6)


def test_capacity_worked_example_drops_the_latest_tokens():
    # capacity = ceil(0.75 * 4 * 2 / 4) = 2: expert 0 (tokens 0, 2, 3) loses token 3, expert 1 (0, 1, 3) loses 3
    sel = np.array([[1, 0], [3, 1], [0, 3], [1, 0]])
    _, tokens, counts, kept = rc.ref_reorder(np.zeros((4, 2)), sel, 4, 0.75)
    assert tokens.tolist() == [0, 2, 0, 1, 1, 2] and counts.tolist() == [2, 2, 0, 2]
    from hyper_parallel import get_platform
    from hyper_parallel.moe import TokenReorderer
    from hyper_parallel.moe.router import expert_capacity

    assert expert_capacity(0.75, 4, 2, 4) == 2 and expert_capacity(1.1, 25, 2, 5) == 11
    got = TokenReorderer(num_experts=4, top_k=2, capacity_factor=0.75)(rc._t(np.zeros((4, 2))), rc._t(sel, "int64"))
    assert get_platform().tolist(got[1]) == kept.tolist()


def test_helper_tensors_follow_the_input_not_the_platform_default(monkeypatch):
    """A layer moved to a device the platform was not set up for (a single GPU used without a process group) must
    not mix devices: the router and the reorderer make their comparison ranges and counts on the input's device.
    Here the platform's default is the "meta" device and the inputs live on the CPU: any helper tensor made on the
    default raises at the first mixed op; all of them on the input's device give the same numbers as before."""
    import torch

    from hyper_parallel import get_platform
    from hyper_parallel.moe import MoE

    moe = MoE(dim=16, hidden_dim=32, num_experts=8, top_k=2, num_expert_groups=4, num_limited_groups=2,
              capacity_factor=1.0, use_expert_bias=True, score_func="sigmoid", init_std=0.3, seed=0)
    x = torch.from_numpy(np.random.RandomState(0).randn(20, 16).astype(np.float32))
    want = moe(x)
    monkeypatch.setattr(get_platform(), "_device", torch.device("meta"))
    got = moe(x)
    assert got.device.type == "cpu" and torch.equal(got, want)
    moe.update_expert_bias(0.001)
    assert moe.tokens_per_expert.device.type == "cpu" and moe.expert_bias.device.type == "cpu"


def test_load_balancing_loss_of_a_uniform_router_is_one():
    from hyper_parallel import get_platform
    from hyper_parallel.moe.losses import load_balancing_loss

    loss = load_balancing_loss(rc._t(np.full((6, 4), 0.25)), rc._t([3, 3, 3, 3], "int64"), 2)
    assert abs(get_platform().tolist(loss) - 1.0) < 1e-6


@pytest.mark.parametrize("name,thunk,pattern", rc.ERRORS, ids=[e[0] for e in rc.ERRORS])
def test_errors_in_process(name, thunk, pattern):
    with pytest.raises(ValueError, match=pattern):
        thunk()


def test_cases_in_process():
    assert rc.router_cases(3) == len(rc.ROUTER_SUBCASES) + 1
    assert rc.reorderer_cases(3) > 0
    assert rc.loss_cases(3) > 0


@pytest.mark.backends("torch", "mindspore")
def test_router_on_every_backend(worlds, backend):
    assert worlds.run(backend, 2, rc.router_cases, 0) == [len(rc.ROUTER_SUBCASES) + 1] * 2


@pytest.mark.backends("torch", "mindspore")
def test_reorderer_on_every_backend(worlds, backend):
    assert worlds.run(backend, 2, rc.reorderer_cases, 0) == [len(rc.REORDER_SHAPES) * len(rc.REORDER_SUBCASES) + 1] * 2


@pytest.mark.backends("torch", "mindspore")
def test_losses_on_every_backend(worlds, backend):
    results = worlds.run(backend, 2, rc.loss_cases, 0)
    assert results[0] == results[1] > 0


@pytest.mark.backends("torch", "mindspore")
def test_errors_on_every_backend(worlds, backend):
    assert worlds.run(backend, 2, rc.error_cases) == [len(rc.ERRORS)] * 2


@pytest.mark.backends("torch", "mindspore")
def test_bookkeeping_kernels_on_every_backend(worlds, backend):
    assert worlds.run(backend, 2, rc.bookkeeping_kernel_cases, 0) == [10] * 2
