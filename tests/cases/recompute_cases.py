"""Activation checkpointing of an expert-parallel MoE layer (torch ``checkpoint``, MindSpore ``Cell.recompute()``):
the same gradients as without it, and the layer's side effects (load counts, load-balancing loss entries, routing
statistics) once per real step."""

from __future__ import annotations

import numpy as np

from hyper_parallel import ExpertParallel, get_platform, init_device_mesh, moe
from hyper_parallel.moe.losses import LoadBalancingLossTracker
from tests.cases.dtensor_cases import _host, _t
from tests.cases.ep_cases import assert_rel

D, H, G, K = 8, 8, 4, 2


def _layer(tracker, recompute: str | None):
    p = get_platform()
    layer = moe.MoE(dim=D, hidden_dim=H, num_experts=G, top_k=K, num_shared_experts=1, use_expert_bias=True,
                    aux_loss_tracker=tracker, init_std=0.3, seed=5)
    ExpertParallel().apply(layer.experts, init_device_mesh("cpu", (p.get_world_size(),), mesh_dim_names=("ep",)))
    if recompute and not p.name.startswith("torch"):
        # MindSpore: the Cell re-runs its construct in backward
        (layer if recompute == "layer" else layer.experts).recompute()
    return layer


def _step(layer, tracker, x, recompute: str | None):
    """The documented tracker pattern: task loss + the batched aux loss, clear, backward. Returns (loss, grads)."""
    p = get_platform()
    params = [q for _, q in p.named_parameters(layer) if q.requires_grad]

    def loss_fn(t):
        if recompute and p.name.startswith("torch"):
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(layer, t, use_reentrant=False)
        else:
            out = layer(t)
        loss = (out ** 2).mean()
        if tracker is not None:
            loss = loss + tracker.loss(top_k=K, coeff=0.1)
            tracker.clear()
        return loss

    value, _, grads = p.value_and_grad(loss_fn, [x], params)
    return float(_host(value)), [_host(g) for g in grads]


def recompute_matches(target: str, steps: int = 10) -> bool:
    """``target``: what is recomputed, ``"layer"`` (torch: ``checkpoint(layer, x)``; MindSpore: ``layer.recompute()``,
    without the loss tracker, which cannot get a gradient there) or ``"experts"`` (MindSpore: the routed experts)."""
    p = get_platform()
    with_tracker = p.name.startswith("torch") or target == "experts"
    trackers = [LoadBalancingLossTracker(), LoadBalancingLossTracker()] if with_tracker else [None, None]
    plain, recomputed = _layer(trackers[0], None), _layer(trackers[1], target)
    for step in range(steps):
        x = _t(np.random.RandomState(10 * step + p.get_rank()).randn(6, D))
        loss_a, grads_a = _step(plain, trackers[0], x, None)
        loss_b, grads_b = _step(recomputed, trackers[1], x, target)
        what = f"step {step} rank {p.get_rank()}"
        assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a), f"{what}: loss {loss_b} != {loss_a}"
        for k, (a, b) in enumerate(zip(grads_a, grads_b)):
            assert_rel(b, a, f"{what} grad {k}", tol=1e-6)
        if with_tracker:
            assert len(trackers[1]) == 0, f"{what}: the recomputation left {len(trackers[1])} stale tracker entries"
        np.testing.assert_array_equal(_host(recomputed.tokens_per_expert), _host(plain.tokens_per_expert),
                                      err_msg=f"{what}: load counts")
        np.testing.assert_array_equal(_host(recomputed.routing_stats.num_tokens_per_expert),
                                      _host(plain.routing_stats.num_tokens_per_expert))
    assert float(_host(plain.tokens_per_expert).sum()) == steps * 6 * K  # counted once per step
    return True


def tracker_in_a_recomputed_cell_is_refused() -> bool:
    """MindSpore runs a recomputed Cell's first forward without autograd: a loss tracker there would get no
    gradient, so the router refuses it."""
    from hyper_parallel.testing.conformance.errors import raises

    tracker = LoadBalancingLossTracker()
    layer = _layer(tracker, "layer")
    raises(ValueError, r"a load-balancing loss tracker inside a recomputed Cell gets no gradient", _step, layer,
           tracker, _t(np.ones((6, D))), "layer")
    return True
