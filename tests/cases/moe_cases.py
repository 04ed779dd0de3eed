"""The MoE layer under every style against the single-device MoE: output, input gradient, every parameter gradient."""

from __future__ import annotations

import numpy as np

from hyper_parallel import (
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
)
from hyper_parallel.expert_parallel.sequence_parallel import ReordererSequenceParallel
from hyper_parallel.moe import MoE
from tests.cases.dtensor_cases import _host, _t, np_local
from tests.cases.ep_cases import assert_rel

D, H, E, K, T = 6, 8, 8, 2, 7  # 7 tokens: uneven over 2 and 4 sequence-parallel ranks


def make_moe(variant: str):
    p = get_platform()
    moe = MoE(dim=D, hidden_dim=H, num_experts=E, top_k=K, num_shared_experts=1 if variant == "shared" else 0,
              use_expert_bias=variant == "skewed", capacity_factor=0.75 if variant == "capacity" else 0.0,
              init_std=0.5, seed=0)
    if variant == "skewed":
        # a large bias on experts 0-3: only they are chosen, so experts 4-7 get no token and the EP ranks that own
        # them receive none
        bias = p.tensor([10.0] * (E // 2) + [0.0] * (E // 2))
        p.replace_parameter(moe, "expert_bias", bias)
    return moe


def _data(data_id: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(40 + data_id)
    return rng.randn(T, D), rng.randn(T, D)


def _layout(style: str):
    world = get_platform().get_world_size()
    rank = get_platform().get_rank()
    if style == "ep":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), rank, range(world)
    if style == "tp":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), 0, [0]
    if style == "sp":  # EP borrowing the TP ranks: tokens replicated, split over ranks by the reorderer
        return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), 0, [0]
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    return mesh, mesh.get_local_rank("ep"), range(2)


def moe_matches_single_device(style: str, variant: str) -> bool:
    p = get_platform()
    mesh, data_id, data_ids = _layout(style)
    ref = make_moe(variant)
    names = [n for n, q in p.named_parameters(ref) if q.requires_grad]
    ref_params = [q for _, q in p.named_parameters(ref) if q.requires_grad]
    summed, own = None, None
    for i in data_ids:
        x, w = _data(i)
        _, (gx,), grads = p.value_and_grad(lambda t, w=w: (ref(t) * _t(w)).sum(), [_t(x)], ref_params)
        grads = [_host(g) for g in grads]
        summed = grads if summed is None else [a + b for a, b in zip(summed, grads)]
        if i == data_id:
            own, ref_out, ref_gx = grads, _host(ref(_t(x))), _host(gx)

    moe = make_moe(variant)
    if style == "ep":
        ExpertParallel().apply(moe.experts, mesh)
    elif style == "tp":
        TensorParallel().apply(moe.experts, mesh)
    elif style == "sp":
        ExpertParallel().apply(moe.experts, mesh)
        ReordererSequenceParallel().apply(moe.reorderer, mesh)
    else:
        ExpertTensorParallel().apply(moe.experts, mesh)
    x, w = _data(data_id)
    params = [q for _, q in p.named_parameters(moe) if q.requires_grad]
    out = moe(_t(x))
    _, (gx,), grads = p.value_and_grad(lambda t: (moe(t) * _t(w)).sum(), [_t(x)], params)
    what = f"MoE {style} {variant} rank {p.get_rank()}"
    assert_rel(_host(out), ref_out, what + " output")
    assert_rel(_host(gx), ref_gx, what + " input grad")
    for name, q, g, mine, total in zip(names, params, grads, own, summed):
        spec = get_parameter_spec(q)
        # sharded expert weights gather every data shard's contribution; replicated ones hold their rank's own
        want = np_local(total, spec.device_mesh, spec.placements) if spec is not None else mine
        assert_rel(_host(g), want, f"{what} grad of {name}")
    return True


def wrong_model_dimension_is_refused() -> int:
    """An input whose last dimension is not the layer's ``dim`` raises, also when its size happens to divide by
    ``dim`` (a reshape to ``[-1, dim]`` would regroup the values into other tokens and run). Returns the cases."""
    import pytest

    moe = make_moe("plain")
    bad = [(4, D - 2), (2, 2, 2 * D), (5, D + 1), (2 * D,)]
    for shape in bad:
        with pytest.raises(ValueError, match=rf"last dimension must be the model dimension dim={D}; got an input "
                                             rf"of shape \[{', '.join(map(str, shape))}\]"):
            moe(_t(np.ones(shape)))
    assert tuple(moe(_t(np.ones((2, 3, D)))).shape) == (2, 3, D)  # leading dims are still any
    return len(bad)


def bias_update_and_aux_loss() -> bool:
    """Aux-loss-free bias: loads are counted across forwards, summed over the world, and the bias moves by
    ``rate * sign(mean - load)``. The batched aux loss sees every forward's router scores."""
    from hyper_parallel.moe import LoadBalancingLossTracker, load_balancing_loss

    p = get_platform()
    world = p.get_world_size()
    tracker = LoadBalancingLossTracker()
    moe = MoE(dim=D, hidden_dim=H, num_experts=E, top_k=K, use_expert_bias=True, aux_loss_tracker=tracker,
              init_std=0.5, seed=0)
    loads = np.zeros(E)
    for step in range(2):
        x = _t(_data(p.get_rank() * 10 + step)[0])
        _, selected, counts = moe.router(x, moe.expert_bias)
        loads += np.asarray(p.tolist(counts), dtype=np.float64)
        moe(x)
    assert len(tracker) == 4  # the explicit router call and the layer's own, twice
    scores = moe.router.scores(x)
    want = p.tolist(load_balancing_loss(scores, counts, K))
    single = LoadBalancingLossTracker()
    single.save(scores, counts)
    assert abs(p.tolist(single.loss(K)) - want) < 1e-6
    total = np.asarray(p.tolist(p.all_reduce(p.tensor(loads.tolist()))))  # every rank's loads
    moe.update_expert_bias(0.01, group=p.init_process_group())
    gap = total.mean() - total
    np.testing.assert_allclose(np.asarray(p.tolist(moe.expert_bias)), 0.01 * np.sign(gap), atol=1e-7)
    assert p.tolist(moe.tokens_per_expert) == [0.0] * E  # the counted loads were consumed
    assert world >= 2
    return True


def compiled_matches_eager() -> int:
    """torch only: the MoE layer under ``torch.compile`` (the ``aot_eager`` backend: dynamo's tracing and AOT autograd,
    no code generation, so no C compiler is needed) gives the eager layer's output and every gradient bit for bit,
    twice in a row, on a single device and under ExpertParallel on every rank; with the router's groups, capacity
    and expert bias, and shared experts."""
    import torch

    p = get_platform()
    world = p.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    checked = 0
    for parallel in (False, True):
        for options in ({}, dict(num_shared_experts=1, num_expert_groups=4, num_limited_groups=2, capacity_factor=1.0,
                                 use_expert_bias=True, score_func="sigmoid")):
            moe = MoE(dim=D, hidden_dim=H, num_experts=E, top_k=K, init_std=0.5, seed=0, **options)
            if parallel:
                ExpertParallel().apply(moe.experts, mesh)
            x = torch.from_numpy(np.random.RandomState(p.get_rank()).randn(T, D).astype(np.float32))

            def run(fn, moe=moe, x=x):
                for q in moe.parameters():
                    q.grad = None
                leaf = x.clone().requires_grad_()
                out = fn(leaf)
                out.square().sum().backward()
                return [out.detach(), leaf.grad] + [q.grad.clone() for q in moe.parameters() if q.grad is not None]

            eager = run(moe)
            compiled = torch.compile(moe, backend="aot_eager")
            for _ in range(2):
                got = run(compiled)
                assert len(got) == len(eager) and all(torch.equal(a, b) for a, b in zip(got, eager)), \
                    (parallel, options, [float((a - b).abs().max()) for a, b in zip(got, eager)])
                checked += 1
            torch._dynamo.reset()
    return checked
