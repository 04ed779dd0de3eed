"""DTensor cases run on every rank: results and gradients against the full tensor computed on the host."""

from __future__ import annotations

import numpy as np

from hyper_parallel import (
    ColwiseParallel,
    DTensor,
    Partial,
    Replicate,
    RowwiseParallel,
    Shard,
    StridedShard,
    distribute_module,
    distribute_parameter,
    distribute_tensor,
    full_parameter,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    parallelize_module,
)
from hyper_parallel.dtensor.placement import chunk_offsets, chunk_sizes, strided_indices
from hyper_parallel.testing.conformance.errors import raises as _raises

PLACEMENTS = {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "P": Partial()}


def _placements(split_factor: int | None) -> dict:
    """:data:`PLACEMENTS`, plus ``SS0``/``SS1`` = ``StridedShard(0/1, split_factor)`` when one is given."""
    if split_factor is None:
        return PLACEMENTS
    return {**PLACEMENTS, "SS0": StridedShard(0, split_factor), "SS1": StridedShard(1, split_factor)}


def _p():
    return get_platform()


def _t(a: np.ndarray):
    p = _p()
    return p.tensor(a.tolist(), dtype="float32") if a.size else p.zeros(a.shape)


def _host(x) -> np.ndarray:
    return np.asarray(_p().tolist(x), dtype=np.float64).reshape(tuple(x.shape))


def np_local(full: np.ndarray, mesh, placements, partial_scale: bool = True) -> np.ndarray:
    """This rank's piece of ``full`` under ``placements``; a Partial axis holds a share ``(k+1)/sum`` of it."""
    out = full
    for axis, pl in enumerate(placements):
        n, k = mesh.size(axis), mesh.get_local_rank(axis)
        if pl.is_shard():
            start, size = chunk_offsets(full.shape[pl.dim], n)[k], chunk_sizes(full.shape[pl.dim], n)[k]
            out = np.take(out, range(start, start + size), axis=pl.dim)
        elif pl.is_strided_shard():
            out = np.take(out, strided_indices(out.shape[pl.dim], pl.split_factor, n, k), axis=pl.dim)
        elif pl.is_partial() and partial_scale:
            out = out * (k + 1) / (n * (n + 1) / 2)
    return out


def _grad_layout(placements):
    return [Replicate() if pl.is_partial() else pl for pl in placements]


def redistribute_pairs(mesh_shape, shape, pairs, split_factor=None):
    """Every ``(src, dst)`` pair: forward equals the full tensor laid out under dst, backward the loss gradient
    laid out under src. ``split_factor`` adds the names ``SS0``/``SS1`` (StridedShard)."""
    p = _p()
    names = _placements(split_factor)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=tuple("ab"[: len(mesh_shape)]))
    rng = np.random.RandomState(0)
    full = rng.randn(*shape)
    weights = rng.randn(*shape)  # the loss is sum(weights * y)
    checked = []
    for src_names, dst_names in pairs:
        src, dst = [names[n] for n in src_names], [names[n] for n in dst_names]
        what = f"{src_names}->{dst_names} on mesh {list(mesh_shape)}, shape {list(shape)}"
        x = _t(np_local(full, mesh, src))
        w = _t(np_local(weights, mesh, dst, partial_scale=False))

        def loss(t):
            d = DTensor.from_local(t, mesh, src, shape=shape).redistribute(mesh, dst)
            assert d.shape == tuple(shape) and d.placements == tuple(dst)
            return (d.to_local() * w).sum()

        y = DTensor.from_local(x, mesh, src, shape=shape).redistribute(mesh, dst).to_local()
        np.testing.assert_allclose(_host(y), np_local(full, mesh, dst), rtol=1e-5, atol=1e-6, err_msg=what)
        _, (g,), _ = p.value_and_grad(loss, [x])
        np.testing.assert_allclose(_host(g), np_local(weights, mesh, _grad_layout(src)), rtol=1e-5, atol=1e-6,
                                   err_msg=what + " (gradient)")
        checked.append(what)
    return len(checked)


def full_tensor_and_distribute(mesh_shape, shape):
    p = _p()
    mesh = init_device_mesh("cpu", mesh_shape)
    rank = p.get_rank()
    full = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    layouts = [[Shard(0)], [Shard(1)], [Replicate()]] if len(mesh_shape) == 1 else \
        [[Shard(0), Shard(1)], [Replicate(), Shard(0)], [Shard(1), Replicate()]]
    for placements in layouts:
        # src_data_rank=0: rank 0's tensor is the truth, the others' (different) data is ignored
        d = distribute_tensor(_t(full * (1 + rank)), mesh, placements, src_data_rank=0)
        np.testing.assert_allclose(_host(d.to_local()), np_local(full, mesh, placements), err_msg=str(placements))
        np.testing.assert_allclose(_host(d.full_tensor()), full, err_msg=f"full_tensor {placements}")
        # src_data_rank=None: no communication, each rank slices its own tensor
        d = distribute_tensor(_t(full * (1 + rank)), mesh, placements, src_data_rank=None)
        np.testing.assert_allclose(_host(d.to_local()), np_local(full * (1 + rank), mesh, placements))
    d = distribute_tensor(_t(full), mesh, [Partial()] + [Replicate()] * (len(mesh_shape) - 1))
    np.testing.assert_allclose(_host(d.full_tensor()), full)
    return True


def to_local_partial_gradient():
    """A Replicate DTensor whose local gradient is declared Partial: backward all-reduces it."""
    p = _p()
    mesh = init_device_mesh("cpu", (p.get_world_size(),))
    rank, world = p.get_rank(), p.get_world_size()
    x = _t(np.ones((2, 3)))
    w = _t(np.full((2, 3), rank + 1.0))
    _, (g,), _ = p.value_and_grad(
        lambda t: (DTensor.from_local(t, mesh, [Replicate()]).to_local(grad_placements=[Partial()]) * w).sum(), [x])
    np.testing.assert_allclose(_host(g), np.full((2, 3), world * (world + 1) / 2))
    with p.count_calls() as calls:
        p.value_and_grad(lambda t: (DTensor.from_local(t, mesh, [Replicate()]).to_local() * w).sum(), [x])
    assert calls["all_reduce"] == 0
    return True


def mesh_api():
    p = _p()
    rank = p.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))
    assert mesh.ndim == 2 and mesh.shape == (2, 2) and mesh.size() == 4 and mesh.size("tp") == 2
    assert mesh.get_coordinate() == [rank // 2, rank % 2]
    assert mesh.get_local_rank("ep") == rank // 2 and mesh.get_local_rank(1) == rank % 2
    assert p.group_ranks(mesh.get_group("tp")) == [2 * (rank // 2), 2 * (rank // 2) + 1]
    assert p.group_ranks(mesh.get_group("ep")) == [rank % 2, rank % 2 + 2]
    ep = mesh["ep"]
    assert ep.ndim == 1 and ep.ranks == (rank % 2, rank % 2 + 2) and ep.get_group() is mesh.get_group("ep")
    swapped = mesh["tp", "ep"]
    assert swapped.shape == (2, 2) and swapped.get_coordinate() == [rank % 2, rank // 2]
    assert swapped.get_group("ep") is mesh.get_group("ep")
    again = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))
    assert again.get_group("tp") is mesh.get_group("tp"), "groups must be created once and cached"
    assert "ep" in repr(mesh)
    _raises(ValueError, r"no axis named 'dp'; its axes are \['ep', 'tp'\]", mesh.__getitem__, "dp")
    _raises(ValueError, r"product equals the world size \(4\); got product 6", init_device_mesh, "cpu", (2, 3))
    _raises(ValueError, r"needs an axis on a 2-D mesh", mesh.get_group)
    _raises(ValueError, r"2 distinct names", init_device_mesh, "cpu", (2, 2), mesh_dim_names=("x", "x"))
    return True


def dtensor_errors():
    p = _p()
    world = p.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    x = _t(np.ones((world, 2)))
    _raises(ValueError, r"one entry per mesh axis \(1\), got 2", DTensor.from_local, x, mesh, [Shard(0), Shard(1)])
    _raises(ValueError, r"Shard\(dim=2\) is out of range for a 2-D tensor; valid dims: \[-2, 2\)",
            DTensor.from_local, x, mesh, [Shard(2)])
    d = DTensor.from_local(x, mesh, [Replicate()])
    _raises(ValueError, r"redistribute to Partial is not supported", d.redistribute, mesh, [Partial()])
    _raises(ValueError, r"local shard shape \[%d, 2\] does not match global shape \[1, 2\]" % world,
            DTensor.from_local, x, mesh, [Shard(0)], shape=(1, 2))
    _raises(ValueError, r"Partial supports reduce_op='sum' only, got 'max'", Partial, "max")
    _raises(TypeError, r"Shard\(dim\) takes an int", Shard, "0")
    assert repr(Shard(0)) == "Shard(dim=0)" and repr(Replicate()) == "Replicate()"
    assert repr(Partial()) == "Partial(reduce_op='sum')"
    module = make_mlp(4, 8, 4)
    distribute_module(module, mesh)
    _raises(ValueError, r"already distributed", distribute_module, module, mesh)
    _raises(ValueError, r"matches no submodule; submodules: \['w1', 'w2'\]", parallelize_module, make_mlp(4, 8, 4),
            mesh, {"w3": ColwiseParallel()})
    return True


def make_mlp(dim: int, hidden: int, out: int, seed: int = 0):
    """``w2(relu(w1(x)))`` with seeded weights, as a torch Module or a MindSpore Cell."""
    p = _p()
    rng = np.random.RandomState(seed)
    w1, b1 = rng.randn(hidden, dim) / np.sqrt(dim), rng.randn(hidden) * 0.1
    w2, b2 = rng.randn(out, hidden) / np.sqrt(hidden), rng.randn(out) * 0.1
    if p.name == "mindspore":
        import mindspore

        class MLP(mindspore.nn.Cell):
            def __init__(self):
                super().__init__()
                self.w1 = mindspore.nn.Dense(dim, hidden)
                self.w2 = mindspore.nn.Dense(hidden, out)

            def construct(self, x):
                return self.w2(mindspore.ops.relu(self.w1(x)))
    else:
        import torch

        class MLP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w1 = torch.nn.Linear(dim, hidden)
                self.w2 = torch.nn.Linear(hidden, out)

            def forward(self, x):
                return self.w2(torch.relu(self.w1(x)))
    model = MLP()
    for name, value in (("w1.weight", w1), ("w1.bias", b1), ("w2.weight", w2), ("w2.bias", b2)):
        sub, attr = name.split(".")
        p.replace_parameter(getattr(model, sub), attr, _t(value))
    return model


def mlp_colwise_rowwise(hidden: int):
    """Colwise then Rowwise equals the single-device MLP: output, input gradient and every parameter gradient."""
    p = _p()
    mesh = init_device_mesh("cpu", (p.get_world_size(),))
    x = _t(np.random.RandomState(1).randn(5, 6))
    ref = make_mlp(6, hidden, 3)
    ref_names = [n for n, _ in p.named_parameters(ref)]
    ref_val, (ref_gx,), ref_g = p.value_and_grad(lambda t: (ref(t) ** 2).sum(), [x],
                                                 [q for _, q in p.named_parameters(ref)])
    model = parallelize_module(make_mlp(6, hidden, 3), mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    params = [q for _, q in p.named_parameters(model)]
    with p.count_calls() as forward_calls:
        model(x)
    assert dict(forward_calls) == {"all_reduce": 1}, dict(forward_calls)
    with p.count_calls() as calls:
        val, (gx,), grads = p.value_and_grad(lambda t: (model(t) ** 2).sum(), [x], params)
    assert calls["all_reduce"] == 2 and sum(calls.values()) == 2, dict(calls)
    np.testing.assert_allclose(_host(val), _host(ref_val), rtol=1e-5)
    np.testing.assert_allclose(_host(gx), _host(ref_gx), rtol=1e-5, atol=1e-6)
    for name, q, g, rg in zip(ref_names, params, grads, ref_g):
        spec = get_parameter_spec(q)
        assert spec is not None and tuple(spec.shape) == tuple(rg.shape), name
        local_ref = np_local(_host(rg), mesh, spec.placements)
        np.testing.assert_allclose(_host(g), local_ref, rtol=1e-5, atol=1e-6, err_msg=f"grad of {name}")
    for (name, q), (_, rq) in zip(p.named_parameters(model), p.named_parameters(ref)):
        np.testing.assert_allclose(_host(full_parameter(q)), _host(rq), rtol=1e-6, err_msg=f"full {name}")
    return True


def prepare_input_output_and_layouts():
    """PrepareModuleInput / PrepareModuleOutput and Colwise / Rowwise with non-default layouts (sequence
    parallel: the MLP input and output sharded on rows), against the single-device MLP."""
    from hyper_parallel import DeviceMesh, PrepareModuleInput, PrepareModuleOutput

    p = _p()
    world, rank = p.get_world_size(), p.get_rank()
    mesh = DeviceMesh("cpu", list(range(world)))  # from a plain list of ranks
    rows = 2 * world
    x_full = np.random.RandomState(3).randn(rows, 6)
    ref = make_mlp(6, 8, 4)
    _, (ref_gx,), _ = p.value_and_grad(lambda t: (ref(t) ** 2).sum(), [_t(x_full)])
    model = make_mlp(6, 8, 4)
    parallelize_module(model, mesh, {
        "w1": ColwiseParallel(input_layouts=Shard(0)),           # rows in, gathered to Replicate
        "w2": RowwiseParallel(output_layouts=Shard(0)),          # reduce-scatter to rows out
    })
    x_local = _t(np_local(x_full, mesh, [Shard(0)]))
    val, (gx,), _ = p.value_and_grad(lambda t: (model(t) ** 2).sum(), [x_local])
    out = model(x_local)
    np.testing.assert_allclose(_host(out), np_local(_host(ref(_t(x_full))), mesh, [Shard(0)]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_host(gx), np_local(_host(ref_gx), mesh, [Shard(0)]), rtol=1e-5, atol=1e-6)

    # DTensor outputs instead of local tensors, and explicit input/output preparation on a wrapper module
    lin = make_mlp(6, 8, 4).w1
    ColwiseParallel(output_layouts=Replicate(), use_local_output=False).apply(lin, mesh)
    y = lin(_t(x_full))
    assert y.placements == (Replicate(),) and tuple(y.shape) == (rows, 8), y
    holder = make_mlp(6, 8, 4)
    PrepareModuleInput(input_layouts=[Shard(0)], desired_input_layouts=[Replicate()],
                       use_local_output=True).apply(holder.w1, mesh)
    PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(0)).apply(holder.w2, mesh)
    got = holder(x_local)  # w1 sees the gathered input; w2's full output is cut back to this rank's rows
    np.testing.assert_allclose(_host(got), np_local(_host(make_mlp(6, 8, 4)(_t(x_full))), mesh, [Shard(0)]),
                               rtol=1e-5, atol=1e-6)
    _raises(ValueError, r"expects 1 inputs, got 0", holder.w1)
    _raises(ValueError, r"same length, got 1 and 2", PrepareModuleInput, input_layouts=[Shard(0)],
            desired_input_layouts=[Replicate(), Replicate()])
    _raises(TypeError, r"applies to linear layers", ColwiseParallel().apply, make_mlp(6, 8, 4), mesh)
    _raises(TypeError, r"must be a ParallelStyle or a dict", parallelize_module, make_mlp(6, 8, 4), mesh, [1])
    _raises(TypeError, r"plan entry 'w1' must be a ParallelStyle, got int", parallelize_module, make_mlp(6, 8, 4),
            mesh, {"w1": 3})
    grid = init_device_mesh("cpu", (2, world // 2)) if world == 4 else None
    if grid is not None:
        _raises(ValueError, r"needs a 1-D mesh", RowwiseParallel().apply, make_mlp(6, 8, 4).w2, grid)
    whole = parallelize_module(make_mlp(6, 8, 4).w1, mesh, ColwiseParallel())  # a style as the whole plan
    assert get_parameter_spec(whole.weight).placements == (Shard(0),)
    return rank


def mesh_from_nested_lists():
    from hyper_parallel import DeviceMesh

    p = _p()
    rank = p.get_rank()
    mesh = DeviceMesh("cpu", [[0, 1], [2, 3]], mesh_dim_names=("a", "b"))
    assert mesh.shape == (2, 2) and mesh.get_coordinate() == [rank // 2, rank % 2]
    pair = DeviceMesh("cpu", [[0, 1]], mesh_dim_names=("row", "col"))  # ranks 2 and 3 are outside this mesh
    if rank >= 2:
        assert pair.get_coordinate() is None
        _raises(ValueError, r"rank %d is not in this mesh" % rank, pair.get_group, 1)
        _raises(ValueError, r"not in this mesh", pair.get_local_rank, 0)
        _raises(ValueError, r"not in this mesh", pair.__getitem__, "col")
    else:
        assert pair.get_local_rank(1) == rank and pair.size(1) == 2
    _raises(ValueError, r"rectangular", DeviceMesh, "cpu", [[0, 1], [2]])
    _raises(ValueError, r"distinct ranks of the world \[0, 4\)", DeviceMesh, "cpu", [0, 0])
    _raises(TypeError, r"nested lists of ranks, got int", DeviceMesh, "cpu", 3)
    _raises(ValueError, r"mesh axis must be a name or an int in \[0, 2\), got 5", mesh.size, 5)
    _raises(ValueError, r"mesh axes must be distinct", mesh.__getitem__, ("a", "a"))
    _raises(ValueError, r"get_local_rank\(\) needs an axis", mesh.get_local_rank)
    assert mesh != pair and len({mesh, DeviceMesh("cpu", [[0, 1], [2, 3]])}) == 1
    line = DeviceMesh("cpu", [0, 1, 2, 3])
    _raises(ValueError, r"its axes have no names", line.__getitem__, "x")
    assert line.get_local_rank() == rank
    d = DTensor.from_local(_t(np.ones((2, 2))), line, [Replicate()])
    assert "DTensor(shape=[2, 2]" in repr(d) and d.ndim == 2 and d.dtype == d.to_local().dtype
    _raises(ValueError, r"across meshes is not supported", d.redistribute, mesh, [Replicate(), Replicate()])
    _raises(ValueError, r"in \[0, 4\) for mesh shape \[4\]; got 9", distribute_tensor, _t(np.ones(2)), line,
            [Replicate()], src_data_rank=9)
    # a sub-mesh whose first rank is not rank 0: each line takes its own first rank's data
    column = mesh["a"]  # ranks {0, 2} or {1, 3}
    d = distribute_tensor(_t(np.full((4, 2), float(rank))), column, [Shard(0)])
    np.testing.assert_allclose(_host(d.full_tensor()), np.full((4, 2), float(column.ranks[0])))
    d = distribute_tensor(_t(np.full((4, 2), float(rank))), mesh, [Shard(0), Replicate()], src_data_rank=1)
    np.testing.assert_allclose(_host(d.full_tensor()), np.full((4, 2), 3.0))  # coordinate (1, 1) is rank 3
    _raises(ValueError, r"has no parameter 'nope'", __import__("hyper_parallel").distribute_parameter,
            make_mlp(2, 2, 2).w1, "nope", line, [Replicate()])
    _raises(ValueError, r"no recorded layout", full_parameter, make_mlp(2, 2, 2).w1.weight)
    _raises(TypeError, r"Placement objects \(Shard, StridedShard, Replicate, Partial\), got 'S0'", DTensor.from_local,
            _t(np.ones(2)), line, ["S0"])
    _raises(ValueError, r"sharded on one mesh axis only", DTensor.from_local, _t(np.ones((2, 2))), mesh,
            [Shard(0), Shard(0)])
    return True


# ------------------------------------------------------------------------------------------------ StridedShard
def _gate_up_reference(gate: np.ndarray, up: np.ndarray, tp: int, r: int, axis: int = 1) -> np.ndarray:
    """Rank ``r``'s block of the fused ``[gate; up]`` under tensor parallelism over ``tp`` ranks, built by hand:
    chunk ``r`` of gate, then chunk ``r`` of up (no use of the library's index arithmetic)."""
    return np.concatenate([np.split(gate, tp, axis=axis)[r], np.split(up, tp, axis=axis)[r]], axis=axis)


def strided_full_tensor_and_distribute(mesh_shape, shape, split_factor):
    """distribute_tensor / from_local / full_tensor with StridedShard on every axis it can take, 1-D or 2-D mesh."""
    p = _p()
    mesh = init_device_mesh("cpu", mesh_shape)
    rank = p.get_rank()
    full = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    ss0, ss1 = StridedShard(0, split_factor), StridedShard(1, split_factor)
    layouts = [[ss0], [ss1], [StridedShard(-1, split_factor)]] if len(mesh_shape) == 1 else \
        [[Shard(0), ss1], [ss0, Shard(1)], [ss1, ss0], [Replicate(), ss1], [ss0, Replicate()], [Partial(), ss1]]
    for placements in layouts:
        what = f"{placements} on mesh {list(mesh_shape)}, shape {list(shape)}"
        want = np_local(full, mesh, [Replicate() if q.is_partial() else q for q in placements])
        d = distribute_tensor(_t(full * (1 + rank)), mesh, placements, src_data_rank=0)
        if not any(q.is_partial() for q in placements):
            np.testing.assert_allclose(_host(d.to_local()), want, err_msg=what)
        np.testing.assert_allclose(_host(d.full_tensor()), full, err_msg=f"full_tensor {what}")
        if not any(q.is_partial() for q in placements):  # src_data_rank=None: each rank slices its own tensor
            d = distribute_tensor(_t(full * (1 + rank)), mesh, placements, src_data_rank=None)
            np.testing.assert_allclose(_host(d.to_local()), want * (1 + rank), err_msg=f"src_data_rank=None {what}")
        # from_local without a shape: StridedShard dims are even, so the global shape is inferred
        e = DTensor.from_local(_t(want), mesh, placements)
        assert e.shape == tuple(shape) and e.placements == d.placements, (e, what)
        if not any(q.is_partial() for q in placements):
            np.testing.assert_allclose(_host(e.full_tensor()), full, err_msg=f"from_local {what}")
    # the rows each rank holds, against the docstring's picture: 8 rows, split_factor 2, 2 ranks
    if mesh_shape == (2,):
        rows = distribute_tensor(_t(np.arange(8.0)), mesh, [StridedShard(0, 2)])
        assert _host(rows.to_local()).tolist() == ([0, 1, 4, 5] if rank == 0 else [2, 3, 6, 7])
    return True


def strided_fused_gate_up(mesh_shape, split_factor):
    """A fused ``[E, s*H, D]`` parameter (``s`` stacked projections, e.g. gate and up) through
    distribute_parameter / full_parameter, against a hand-built reference; on a 2-D mesh as ETP lays experts out:
    ``[Shard(0), StridedShard(1, s)]`` on ("ep", "tp"). Also the gradient through full_parameter."""
    p = _p()
    two_d = len(mesh_shape) == 2
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("ep", "tp") if two_d else ("tp",))
    tp = mesh.size("tp")
    E, H, D = 4, 2 * tp, 3
    rng = np.random.RandomState(5)
    projections = [rng.randn(E, H, D) for _ in range(split_factor)]
    fused = np.concatenate(projections, axis=1)
    placements = [Shard(0), StridedShard(1, split_factor)] if two_d else [StridedShard(1, split_factor)]
    holder = make_mlp(2, 2, 2).w1
    p.replace_parameter(holder, "weight", _t(fused))
    param = distribute_parameter(holder, "weight", mesh, placements)
    r = mesh.get_local_rank("tp")
    want = np.concatenate([np.split(q, tp, axis=1)[r] for q in projections], axis=1)
    if split_factor == 2:
        np.testing.assert_array_equal(want, _gate_up_reference(*projections, tp, r))
    if two_d:
        want = np.split(want, mesh.size("ep"), axis=0)[mesh.get_local_rank("ep")]
    np.testing.assert_allclose(_host(param), want, err_msg=f"local shard under {placements}")
    spec = get_parameter_spec(param)
    assert spec.placements == tuple(placements) and spec.shape == fused.shape, spec
    np.testing.assert_allclose(_host(full_parameter(param)), fused, err_msg="full_parameter")
    weights = rng.randn(*fused.shape)
    _, (g,), _ = p.value_and_grad(lambda t: (full_parameter_of(t, spec) * _t(weights)).sum(), [_t(_host(param))])
    np.testing.assert_allclose(_host(g), np_local(weights, mesh, placements), rtol=1e-6, atol=1e-6,
                               err_msg="gradient through full_tensor")
    return True


def full_parameter_of(local, spec):
    return DTensor.from_local(local, spec.device_mesh, spec.placements, shape=spec.shape).full_tensor()


def strided_matches_torch(mesh_shape, split_factor):
    """Our StridedShard gives every rank the same local tensor as torch's ``distribute_tensor`` with
    ``_StridedShard(dim, split_factor=)`` (torch only), and both gather back the same full tensor."""
    import torch
    from torch.distributed.tensor import Shard as TorchShard
    from torch.distributed.tensor import distribute_tensor as torch_distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from hyper_parallel.integrations.torch_dcp import torch_device_mesh, torch_placements

    mesh = init_device_mesh("cpu", mesh_shape)
    tmesh = torch_device_mesh(mesh, "cpu")
    n = 4 * split_factor
    full = np.arange(n * n * 2, dtype=np.float64).reshape(n, 2 * n)
    ours0, ours1 = StridedShard(0, split_factor), StridedShard(1, split_factor)
    theirs0, theirs1 = _StridedShard(0, split_factor=split_factor), _StridedShard(1, split_factor=split_factor)
    if len(mesh_shape) == 1:
        cases = [([ours0], [theirs0]), ([ours1], [theirs1])]
    else:
        cases = [([Shard(0), ours1], [TorchShard(0), theirs1]), ([ours1, Shard(0)], [theirs1, TorchShard(0)])]
    for ours, theirs in cases:
        assert torch_placements(ours, 2) == tuple(theirs), torch_placements(ours, 2)
        mine = distribute_tensor(_t(full), mesh, ours)
        ref = torch_distribute_tensor(torch.tensor(full, dtype=torch.float32), tmesh, theirs)
        np.testing.assert_array_equal(_host(mine.to_local()), ref.to_local().numpy(), err_msg=str(ours))
        np.testing.assert_array_equal(_host(mine.full_tensor()), ref.full_tensor().numpy(), err_msg=str(ours))
    return True


def strided_errors():
    p = _p()
    world = p.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    _raises(TypeError, r"StridedShard\(split_factor\) takes an int >= 1, got 2.0", StridedShard, 0, 2.0)
    _raises(TypeError, r"StridedShard\(dim\) takes an int, got '0'", StridedShard, "0", 2)
    _raises(ValueError, r"StridedShard\(split_factor\) must be an int >= 1, got 0", StridedShard, 0, 0)
    assert repr(StridedShard(1, 2)) == "StridedShard(dim=1, split_factor=2)"
    assert StridedShard(1, 2) == StridedShard(1, split_factor=2) != Shard(1)
    ss = StridedShard(0, 2)
    assert ss.is_strided_shard() and ss.is_strided_shard(0) and not ss.is_strided_shard(1)
    assert not ss.is_shard() and ss.is_shard_like(0) and Shard(0).is_shard_like(0) and not Shard(0).is_strided_shard()
    rows = 2 * world + 2  # divisible by world, not by 2 * world
    divisor = 2 * world
    msg = (r"StridedShard\(dim=0, split_factor=2\) on mesh axis 0 \(size %d\) needs tensor dim 0's size divisible "
           r"by split_factor \* axis size = 2 \* %d = %d; got size %d" % (world, world, divisor, rows))
    _raises(ValueError, msg, distribute_tensor, _t(np.ones((rows, 2))), mesh, [ss])
    _raises(ValueError, msg, DTensor.from_local, _t(np.ones((rows // world, 2))), mesh, [ss], shape=(rows, 2))
    _raises(ValueError, r"divisible by split_factor \* axis size = 2 \* %d = %d; got size %d" % (world, divisor, world),
            DTensor.from_local, _t(np.ones((1, 2))), mesh, [ss])  # the shape inferred from 1 row per rank
    d = distribute_tensor(_t(np.ones((rows, 2))), mesh, [Replicate()])
    _raises(ValueError, msg, d.redistribute, mesh, [ss])
    _raises(ValueError, r"local shard shape \[3, 2\] does not match global shape \[%d, 2\]" % (4 * world),
            DTensor.from_local, _t(np.ones((3, 2))), mesh, [ss], shape=(4 * world, 2))
    _raises(ValueError, r"StridedShard\(dim=2, split_factor=2\) is out of range for a 2-D tensor; valid dims: "
            r"\[-2, 2\)", DTensor.from_local, _t(np.ones((2, 2))), mesh, [StridedShard(2, 2)])
    _raises(ValueError, r"redistribute to Partial is not supported .*valid targets are Shard\(dim\), "
            r"StridedShard\(dim, split_factor\) and Replicate\(\)",
            distribute_tensor(_t(np.ones((4 * world, 2))), mesh, [ss]).redistribute, mesh, [Partial()])
    if world == 4:
        grid = init_device_mesh("cpu", (2, 2))
        _raises(ValueError, r"each tensor dim may be sharded on one mesh axis only", DTensor.from_local,
                _t(np.ones((2, 2))), grid, [Shard(0), StridedShard(0, 2)])
    return True
