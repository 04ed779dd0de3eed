"""What a step shows: the library log per rank, named profiler ranges, and the MoE layer's routing statistics."""

from __future__ import annotations

import io
import logging

import numpy as np

from hyper_parallel import ExpertParallel, get_platform, init_device_mesh
from hyper_parallel.log import configure_logging
from hyper_parallel.moe import MoE
from tests.cases.dtensor_cases import _t

D, H, E, K, T = 6, 8, 8, 2, 12


def _ep_moe(**kw):
    p = get_platform()
    moe = MoE(dim=D, hidden_dim=H, num_experts=E, top_k=K, init_std=0.5, seed=0, **kw)
    ExpertParallel().apply(moe.experts, init_device_mesh("cpu", (p.get_world_size(),), mesh_dim_names=("ep",)))
    return moe


def _x():
    return _t(np.random.RandomState(3 + get_platform().get_rank()).randn(T, D))


def debug_log_of_a_step() -> str:
    """The library's debug log of building and running one EP MoE step, captured on this rank."""
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    try:
        moe = _ep_moe()
        p = get_platform()
        p.value_and_grad(lambda t: moe(t).sum(), [_x()])
    finally:
        logging.getLogger("hyper_parallel").setLevel(logging.WARNING)
    return stream.getvalue()


def profiler_range_names() -> list[str]:
    """Names of the ranges torch's profiler recorded around an EP MoE forward + backward (torch only)."""
    import torch

    moe = _ep_moe(num_shared_experts=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        get_platform().value_and_grad(lambda t: moe(t).sum(), [_x()])
    return sorted({e.name for e in prof.events() if e.name.startswith("hyper_parallel.")})


def routing_stats_match_the_routing(capacity_factor: float) -> bool:
    """``moe.routing_stats`` against loads recomputed from the router's own choices."""
    p = get_platform()
    moe = _ep_moe(capacity_factor=capacity_factor)
    x = _x()
    moe(x)
    stats = moe.routing_stats
    _, selected, _ = moe.router(x)
    load = np.bincount(np.asarray(p.tolist(selected)).reshape(-1), minlength=E)
    kept = load if capacity_factor == 0 else np.minimum(load, moe.reorderer.capacity(T))
    assert p.tolist(stats.num_tokens_per_expert) == load.tolist(), (p.tolist(stats.num_tokens_per_expert), load)
    assert p.tolist(stats.num_kept_per_expert) == kept.tolist(), (p.tolist(stats.num_kept_per_expert), kept)
    assert stats.num_dropped == int((load - kept).sum()) and load.sum() == T * K
    if capacity_factor:
        assert stats.num_dropped > 0  # the case is built to drop: it must exercise the count
    return True
