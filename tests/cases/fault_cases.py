"""Faults on one rank, starved ranks, inputs without gradient: every rank issues the same collectives and raises the
same error, and the world keeps working afterwards."""

from __future__ import annotations

import numpy as np

from hyper_parallel import ExpertParallel, get_parameter_spec, get_platform, init_device_mesh, moe
from tests.cases.dtensor_cases import _host, _t, np_local
from tests.cases.ep_cases import assert_rel
from tests.cases.moe_cases import D, T, make_moe


def _ep_mesh():
    return init_device_mesh("cpu", (get_platform().get_world_size(),), mesh_dim_names=("ep",))


def _poison_router(layer) -> None:
    """A diverged router: NaN gate weights, so every score is NaN."""
    p = get_platform()
    p.replace_parameter(layer.router, "gate", layer.router.gate * float("nan"))


def starved_step_matches_single_device(nan_router: bool) -> bool:
    """A training step of a MoE whose upper experts get no token (their EP ranks receive zero rows), with an input
    that does not require grad (a first layer fed by data): it finishes, with the single-device loss and parameter
    gradients (NaN everywhere, on every rank, when the router has diverged)."""
    p = get_platform()
    rank, world = p.get_rank(), p.get_world_size()
    data = [np.random.RandomState(60 + i).randn(T, D) for i in range(world)]
    ref = make_moe("skewed")
    if nan_router:
        _poison_router(ref)
    ref_params = [q for _, q in p.named_parameters(ref) if q.requires_grad]
    want_loss, summed = 0.0, None
    for x in data:
        loss, _, grads = p.value_and_grad(lambda x=x: ref(_t(x)).sum(), [], ref_params)
        want_loss += float(p.tolist(loss))
        grads = [_host(g) for g in grads]
        summed = grads if summed is None else [a + b for a, b in zip(summed, grads)]

    layer = make_moe("skewed")
    if nan_router:
        _poison_router(layer)
    ExpertParallel().apply(layer.experts, _ep_mesh())
    params = [q for _, q in p.named_parameters(layer) if q.requires_grad]
    names = [n for n, q in p.named_parameters(layer) if q.requires_grad]
    loss, _, grads = p.value_and_grad(lambda: layer(_t(data[rank])).sum(), [], params)
    total = float(p.tolist(p.all_reduce(p.tensor([float(p.tolist(loss))]))[0]))
    if nan_router:
        assert np.isnan(total) and np.isnan(want_loss), (total, want_loss)
        return True
    assert abs(total - want_loss) <= 1e-5 * max(1.0, abs(want_loss)), (total, want_loss)
    for name, q, g, full in zip(names, params, grads, summed):
        spec = get_parameter_spec(q)
        if spec is not None:  # expert shards: the exchange already summed every rank's tokens
            assert_rel(_host(g), np_local(full, spec.device_mesh, spec.placements), f"rank {rank} grad of {name}")
    return True


def one_rank_sends_bad_input(kind: str) -> str:
    """Rank 1 alone gets a malformed dispatch input; every rank must raise the same ValueError. Returns it."""
    p = get_platform()
    rank, world = p.get_rank(), p.get_world_size()
    experts = moe.GroupedExperts(dim=D, hidden_dim=8, num_experts=2 * world, init_std=0.5, seed=0)
    style, mesh = ExpertParallel(), _ep_mesh()
    style.apply(experts, mesh)
    G = 2 * world
    counts, rows, dtype = [1] * G, G, "float32"
    if rank == 1:
        if kind == "sum":
            counts = [1] * (G - 1) + [3]
        elif kind == "length":
            counts = [1] * (G + 2)
            rows = G + 2
        elif kind == "negative":
            counts = [2, -1] + [1] * (G - 2)
        elif kind == "float_counts":
            counts = None
        elif kind == "hidden":
            pass  # below
        elif kind == "dtype":
            dtype = "bfloat16"
    x = p.tensor(np.ones((rows, D + (1 if kind == "hidden" and rank == 1 else 0))).tolist(), dtype=dtype)
    counts_t = p.tensor([1.0] * G, dtype="float32") if counts is None else p.tensor(counts, dtype="int64")
    try:
        style.dispatch(x, counts_t, mesh, num_experts=G)
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError(f"rank {rank}: no error for a bad {kind!r} on rank 1")
    assert "rank 1:" in message and "raised on every rank" in message, message
    # nothing half-sent: the world still works
    assert p.tolist(p.all_reduce(p.tensor([1.0]))) == [float(world)]
    return message


def experts_built_differently() -> str:
    """Rank 1 builds its experts with another expert count: apply raises on every rank, naming both shapes."""
    p = get_platform()
    world = p.get_world_size()
    G = 2 * world + (world if p.get_rank() == 1 else 0)
    experts = moe.GroupedExperts(dim=D, hidden_dim=8, num_experts=G, init_std=0.5, seed=0)
    try:
        ExpertParallel().apply(experts, _ep_mesh())
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("no error for experts built differently")
    assert p.tolist(p.all_reduce(p.tensor([1.0]))) == [float(world)]
    return message


def _checks_on():
    import os

    from hyper_parallel.collective_checks import ENV_VAR

    class _On:
        def __enter__(self):
            os.environ[ENV_VAR] = "1"

        def __exit__(self, *exc):
            os.environ.pop(ENV_VAR, None)

    return _On()


def etp_tp_line_with_different_tokens() -> str:
    """ETP 2x2 where one tp line's ranks hold different tokens: with the checks on, every rank raises."""
    from hyper_parallel import ExpertTensorParallel

    p = get_platform()
    rank, world = p.get_rank(), p.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    experts = moe.GroupedExperts(dim=D, hidden_dim=8, num_experts=4, init_std=0.5, seed=0)
    style = ExpertTensorParallel()
    style.apply(experts, mesh)
    # the ep line of rank 1 gets rank-dependent tokens: tp line (0, 1) disagrees, line (2, 3) agrees
    value = 1.0 + (rank if rank < 2 else 0)
    x = p.tensor(np.full((4, D), value).tolist())
    with _checks_on():
        try:
            style.dispatch(x, p.tensor([1, 1, 1, 1], dtype="int64"), mesh, num_experts=4)
        except ValueError as e:
            message = str(e)
        else:
            raise AssertionError(f"rank {rank}: different tokens on a tp line were not detected")
    assert p.tolist(p.all_reduce(p.tensor([1.0]))) == [float(world)]
    return message


def disagreeing_collective(kind: str) -> str:
    """Raw collectives that disagree across ranks, with HYPER_PARALLEL_CHECK_COLLECTIVES=1: the same ValueError on
    every rank instead of garbage, an abort or a hang."""
    p = get_platform()
    rank, world = p.get_rank(), p.get_world_size()
    with _checks_on():
        try:
            if kind == "splits":  # rank 0 sends 2 rows to rank 1, which expects 1
                send = [1] * world
                recv = [1] * world
                if rank == 0:
                    send[1] = 2
                x = p.zeros((sum(send), 3))
                p.all_to_all_single(x, output_split_sizes=recv, input_split_sizes=send)
            elif kind == "dtype":
                p.all_reduce(p.zeros((2,), dtype="int32" if rank == 1 else "float32"))
            elif kind == "collective":
                x = p.zeros((2,))
                p.broadcast(x, src=0) if rank == 1 else p.all_reduce(x)
            elif kind == "shape":
                p.all_gather_into_tensor(p.zeros((2 + (rank == 1), 3)))
        except ValueError as e:
            message = str(e)
        else:
            raise AssertionError(f"rank {rank}: {kind} disagreement not detected")
    # checks off again: the world works, and an agreeing collective runs with no descriptor exchange
    with p.count_calls() as calls:
        assert p.tolist(p.all_reduce(p.tensor([1.0]))) == [float(world)]
    assert dict(calls) == {"all_reduce": 1, "host_sync": 1}, dict(calls)
    return message


def tokens_of_another_dtype_than_the_experts() -> str:
    """float16 tokens into float32 experts under EP, with some ranks receiving no rows: every rank raises the same
    TypeError in the experts (none is left waiting in the combine)."""
    p = get_platform()
    world = p.get_world_size()
    experts = moe.GroupedExperts(dim=D, hidden_dim=8, num_experts=2 * world, init_std=0.5, seed=0)
    ExpertParallel().apply(experts, _ep_mesh())
    counts = [3, 1] + [0] * (2 * world - 2)  # only rank 0's experts get rows
    x = p.tensor(np.ones((4, D)).tolist(), dtype="float16")
    try:
        experts(x, p.tensor(counts, dtype="int64"))
    except TypeError as e:
        message = str(e)
    else:
        raise AssertionError("float16 tokens into float32 experts were accepted")
    assert p.tolist(p.all_reduce(p.tensor([1.0]))) == [float(world)]
    return message
