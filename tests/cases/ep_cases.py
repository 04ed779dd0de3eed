"""Expert-parallel styles against the single-device experts: outputs, input gradients, every parameter gradient."""

from __future__ import annotations

import numpy as np

from hyper_parallel import (
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    moe,
)
from hyper_parallel.testing.conformance.errors import raises as _raises
from tests.cases.dtensor_cases import _host, _t, np_local

G, D, H = 8, 6, 8  # global experts, model dim, expert hidden dim


def assert_rel(got: np.ndarray, want: np.ndarray, what: str, tol: float = 1e-5) -> None:
    """Relative error ``||got - want|| / ||want|| <= tol`` (fp32: summation order differs between layouts)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def routed_inputs(data_id: int, pattern: str, num_data: int) -> tuple[np.ndarray, list[int]]:
    """Rows grouped by global expert, and the counts, for the data of ``data_id``."""
    rng = np.random.RandomState(100 + data_id)
    counts = rng.randint(0, 4, G)
    if pattern == "empty_expert":
        counts[3] = 0  # no rank routes to expert 3
    elif pattern == "zero_rank" and data_id == num_data - 1:
        counts[:] = 0  # the last rank routes nothing (and receives little)
    elif pattern == "receives_none":
        counts[G // 2:] = 0  # experts of the upper EP ranks get nothing: those ranks receive zero tokens
    counts = [int(c) for c in counts]
    return rng.randn(sum(counts), D), counts


def _layout(style: str):
    p = get_platform()
    world = p.get_world_size()
    if style == "ep":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        return mesh, ExpertParallel(), p.get_rank(), world
    if style == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        return mesh, TensorParallel(), 0, 1
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    if style == "ep_submesh":  # EP on one axis of a 2-D mesh: the lines {0, 2} and {1, 3} each hold all experts
        return mesh["ep"], ExpertParallel(), mesh.get_local_rank("ep"), 2
    return mesh, ExpertTensorParallel(), mesh.get_local_rank("ep"), 2


def _experts():
    return moe.GroupedExperts(dim=D, hidden_dim=H, num_experts=G, init_std=0.5, seed=0)


def _loss_weights(data_id: int, rows: int):
    return np.random.RandomState(500 + data_id).randn(rows, D)


def experts_match_single_device(style: str, pattern: str, two_layers: bool = False) -> dict:
    p = get_platform()
    mesh, style_obj, data_id, num_data = _layout(style)
    # reference: every data shard's loss through the unsharded experts; parameter grads summed over shards
    refs = [_experts()] + ([_experts()] if two_layers else [])
    ref_params = [q for m in refs for _, q in p.named_parameters(m)]
    ref_out, ref_gx, ref_grads = None, None, None
    for i in range(num_data):
        x_np, counts = routed_inputs(i, pattern, num_data)
        w = _t(_loss_weights(i, len(x_np)))

        def ref_fn(t, counts=counts, w=w):
            for m in refs:
                t = m(t, tuple(counts))
            return t

        _, (gx,), grads = p.value_and_grad(lambda t: (ref_fn(t) * w).sum(), [_t(x_np)], ref_params)
        ref_grads = [_host(g) if ref_grads is None else ref_grads[k] + _host(g) for k, g in enumerate(grads)] \
            if ref_grads is not None else [_host(g) for g in grads]
        if i == data_id:
            ref_out, ref_gx = _host(ref_fn(_t(x_np))), _host(gx)

    layers = [_experts()] + ([_experts()] if two_layers else [])
    for m in layers:
        style_obj.apply(m, mesh)  # one style object serves every layer
    x_np, counts = routed_inputs(data_id, pattern, num_data)
    counts_t = p.tensor(counts, dtype="int64")
    w = _t(_loss_weights(data_id, len(x_np)))

    def model(t):
        for m in layers:
            t = m(t, counts_t)
        return t

    with p.count_calls() as calls:
        out = model(_t(x_np))
    params = [q for m in layers for _, q in p.named_parameters(m)]
    _, (gx,), grads = p.value_and_grad(lambda t: (model(t) * w).sum(), [_t(x_np)], params)
    what = f"{style} {pattern} rank {p.get_rank()}"
    if len(x_np):
        assert_rel(_host(out), ref_out, what + " output")
        assert_rel(_host(gx), ref_gx, what + " input grad")
    else:
        assert tuple(out.shape) == (0, D) and tuple(gx.shape) == (0, D), what
    for k, (q, g) in enumerate(zip(params, grads)):
        spec = get_parameter_spec(q)
        assert_rel(_host(g), np_local(ref_grads[k], spec.device_mesh, spec.placements), f"{what} grad of param {k}")
    return dict(calls)


def bad_configs():
    world = get_platform().get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    _raises(ValueError, r"expert parallel degree \(%d\) must divide num_experts \(6\)" % world,
            ExpertParallel().apply, moe.GroupedExperts(dim=4, hidden_dim=4, num_experts=6), mesh)
    _raises(ValueError, r"needs a 2-D mesh with axes \('ep', 'tp'\)", ExpertTensorParallel().apply, _experts(), mesh)
    grid = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    _raises(ValueError, r"needs a mesh with axes \('ep', 'tp'\); this mesh has axes \['dp', 'tp'\]",
            ExpertTensorParallel().apply, _experts(), grid)
    _raises(ValueError, r"tensor parallel degree \(%d\) must divide the experts' hidden_dim \(6\)" % world,
            TensorParallel().apply, moe.GroupedExperts(dim=4, hidden_dim=6, num_experts=4), mesh)
    experts = _experts()
    ExpertParallel().apply(experts, mesh)
    _raises(ValueError, r"num_tokens_per_expert sums to 3 but routed_input has 2 rows", experts,
            _t(np.ones((2, D))), get_platform().tensor([3] + [0] * (G - 1), dtype="int64"))
    _raises(ValueError, r"GroupedExperts: num_experts must be a positive int, got 0", moe.GroupedExperts, dim=2,
            hidden_dim=2, num_experts=0)
    return True
