"""Conformance cases for the platform contract; each runs on every rank of a world and asserts real values.

Expected values are computed on the host from the rank and world size, never by the collective under test.
"""

from __future__ import annotations

import time

import numpy as np

from hyper_parallel import functional as F
from hyper_parallel import get_platform

FLOAT_TOL = {"float32": 1e-6, "bfloat16": 1e-2, "int64": 0, "int32": 0, "float64": 1e-12, "float16": 1e-3}


def _p():
    return get_platform()


def _close(got, want, dtype: str, what: str) -> None:
    """Compare a tensor (or host list) with the expected values, shapes included (zero-row shapes too)."""
    if isinstance(got, _p().Tensor):
        got = np.asarray(_p().tolist(got), dtype=np.float64).reshape(tuple(got.shape))
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    np.testing.assert_allclose(got, want, rtol=FLOAT_TOL[dtype], atol=FLOAT_TOL[dtype], err_msg=what)


def _rows(values: np.ndarray, dtype: str, cols: int = 3):
    """A [len(values), cols] tensor whose row i is filled with values[i] (works for zero rows)."""
    p = _p()
    if len(values) == 0:
        return p.zeros((0, cols), dtype=dtype)
    return p.tensor(np.repeat(np.asarray(values, dtype=np.float64)[:, None], cols, axis=1).tolist(), dtype=dtype)


# ---------------------------------------------------------------- identity and process groups
def identity():
    p = _p()
    assert not type(p).__abstractmethods__, f"adapter misses {sorted(type(p).__abstractmethods__)}"
    assert isinstance(p.name, str) and p.name in ("torch", "torch_npu", "mindspore")
    assert isinstance(p.device_type, str) and p.device_type
    assert p.dist_backend in ("gloo", "nccl", "hccl", "mccl")
    for cls in (p.Tensor, p.Parameter, p.Module):
        assert isinstance(cls, type)
    assert isinstance(p.zeros((1,)), p.Tensor)
    assert p.versions() and all(isinstance(v, str) for v in p.versions().values())
    assert p.is_initialized()
    assert p.init_process_group() is p.init_process_group()  # idempotent
    return p.get_rank(), p.get_world_size(), p.group_rank(), p.group_size(), p.group_ranks()


def barrier_blocks():
    """Rank 0 arrives late; everyone else must wait for it, on the first and on later barriers."""
    p = _p()
    waits = []
    for _ in range(2):
        start = time.monotonic()
        if p.get_rank() == 0:
            time.sleep(0.6)
        p.barrier()
        waits.append(time.monotonic() - start)
    if p.get_rank() != 0:
        assert min(waits) > 0.4, f"barrier did not block: waited {waits}"
    return waits


def mesh_groups_2x2():
    """Rows {0,1},{2,3} and columns {0,2},{1,3}: every rank creates every group; collectives stay inside."""
    p = _p()
    rank = p.get_rank()
    rows = [p.new_group([0, 1]), p.new_group([2, 3])]
    cols = [p.new_group([0, 2]), p.new_group([1, 3])]
    row, col = rows[rank // 2], cols[rank % 2]
    assert p.group_ranks(row) == [2 * (rank // 2), 2 * (rank // 2) + 1] and p.group_size(row) == 2
    assert p.group_rank(row) == rank % 2 and p.group_rank(col) == rank // 2
    other_row = rows[1 - rank // 2]
    assert other_row.native is None  # non-members hold no native handle
    x = _rows(np.array([rank + 1.0]), "float32")
    _close(p.tolist(p.all_reduce(x, group=row)), [[sum(r + 1.0 for r in row.ranks)] * 3], "float32", "row sum")
    _close(p.tolist(p.all_reduce(x, group=col)), [[sum(r + 1.0 for r in col.ranks)] * 3], "float32", "col sum")
    gathered = p.all_gather_into_tensor(x, group=col)
    _close(p.tolist(gathered), [[r + 1.0] * 3 for r in col.ranks], "float32", "col gather")
    # uneven all_to_all inside the row: member i sends (i + j + 1) rows to member j
    me = p.group_rank(row)
    send = [me + j + 1 for j in range(2)]
    recv = [i + me + 1 for i in range(2)]
    payload = _rows(np.concatenate([np.full(n, 100.0 * rank + j) for j, n in enumerate(send)]), "float32")
    out, _ = p.all_to_all_single(payload, output_split_sizes=recv, input_split_sizes=send, group=row)
    want = np.concatenate([np.full(n, 100.0 * row.ranks[i] + me) for i, n in enumerate(recv)])
    _close(p.tolist(out), np.repeat(want[:, None], 3, 1), "float32", "row all_to_all")
    p.barrier(col)
    return True


# ---------------------------------------------------------------- collectives
def all_reduce(dtype: str):
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    x = _rows(np.array([rank + 1.0, -rank - 2.0]), dtype)
    before = p.tolist(x)
    _close(p.tolist(p.all_reduce(x)), _sum_rows(world), dtype, "sum")
    _close(p.tolist(p.all_reduce(x, op="max")), [[world] * 3, [-2.0] * 3], dtype, "max")
    if dtype.startswith(("float", "bfloat")):
        _close(p.tolist(p.all_reduce(x, op="AVG")), np.asarray(_sum_rows(world)) / world, dtype, "avg")
    assert p.tolist(x) == before, "all_reduce must not modify its input"
    return True


def _sum_rows(world: int):
    return [[sum(r + 1.0 for r in range(world))] * 3, [sum(-r - 2.0 for r in range(world))] * 3]


def all_gather(dtype: str):
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    out = p.all_gather_into_tensor(_rows(np.array([10.0 * rank, 10.0 * rank + 1]), dtype))
    want = [[10.0 * r + i] * 3 for r in range(world) for i in range(2)]
    _close(p.tolist(out), want, dtype, "all_gather_into_tensor")
    return True


def reduce_scatter(dtype: str):
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    x = _rows(np.arange(2 * world, dtype=np.float64) * (rank + 1), dtype)  # 2 rows per member
    scale = sum(r + 1 for r in range(world))
    mine = np.arange(2 * world, dtype=np.float64)[2 * rank: 2 * rank + 2]
    _close(p.tolist(p.reduce_scatter_tensor(x)), np.repeat(mine[:, None] * scale, 3, 1), dtype, "sum")
    _close(p.tolist(p.reduce_scatter_tensor(x, op="max")), np.repeat(mine[:, None] * world, 3, 1), dtype, "max")
    if dtype != "int64":
        _close(p.tolist(p.reduce_scatter_tensor(x, op="avg")), np.repeat(mine[:, None] * scale / world, 3, 1),
               dtype, "avg")
    return True


def broadcast(dtype: str):
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    src = world - 1
    out = p.broadcast(_rows(np.array([rank * 7.0 + 1]), dtype), src=src)
    _close(p.tolist(out), [[src * 7.0 + 1] * 3], dtype, "broadcast")
    return True


SPLIT_PATTERNS = ("even", "uneven", "partly_zero", "all_zero")


def split_matrix(pattern: str, world: int) -> np.ndarray:
    """``m[i, j]`` = rows rank i sends to rank j."""
    i, j = np.meshgrid(np.arange(world), np.arange(world), indexing="ij")
    if pattern == "even":
        return np.full((world, world), 2)
    if pattern == "uneven":
        return 1 + (i * 3 + j * 2) % 4
    if pattern == "partly_zero":
        return np.where((i + j) % 3 == 0, 0, 1 + (i + 2 * j) % 3)
    if pattern == "all_zero":
        return np.zeros((world, world), dtype=int)
    raise ValueError(pattern)


def all_to_all(pattern: str, dtype: str, async_op: bool = False):
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    m = split_matrix(pattern, world)
    send, recv = m[rank].tolist(), m[:, rank].tolist()
    # row k sent to j carries 8*(world*rank + j) + k: origin, destination and position, exact in bf16 at 4 ranks
    values = np.concatenate([8.0 * (world * rank + j) + np.arange(n) for j, n in enumerate(send)] or [[]])
    x = _rows(values, dtype)
    out, handle = p.all_to_all_single(x, output_split_sizes=recv, input_split_sizes=send, output_shape=(sum(recv), 3),
                                        async_op=async_op)
    handle.wait()
    assert handle.is_completed()
    want = np.concatenate([8.0 * (world * i + rank) + np.arange(n) for i, n in enumerate(recv)] or [[]])
    _close(out, np.repeat(want[:, None], 3, 1).reshape(-1, 3), dtype, f"all_to_all {pattern}")
    assert p.dtype_name(out.dtype) == dtype
    return sum(recv)


# ---------------------------------------------------------------- gradients of the differentiable collectives
def gradients():
    """d/dx of sum(w * op(x)) for each differentiable collective, against its analytic value."""
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    x = _rows(np.array([1.0 + rank, 2.0]), "float32", cols=2)

    def check(op, out_rows: int, want_grad, what: str):
        # weights depend on (owner rank, output row), so each rank's gradient is distinct and checkable
        w = _rows(np.arange(out_rows) + 10.0 * rank, "float32", cols=2)
        _, (g,), _ = p.value_and_grad(lambda t: (op(t) * w).sum(), [x])
        _close(p.tolist(g), want_grad, "float32", what)

    # all_reduce: y = sum_r x_r on every rank -> dL/dx = sum_r w_r
    w_sum = np.array([sum(10.0 * r + k for r in range(world)) for k in range(2)])
    check(F.all_reduce_autograd, 2, np.repeat(w_sum[:, None], 2, 1), "all_reduce grad")
    # identity forward, all_reduce backward: the same gradient
    check(F.identity_fwd_all_reduce_bwd, 2, np.repeat(w_sum[:, None], 2, 1), "identity/all_reduce grad")
    # all_gather: rows [2*rank, 2*rank+1] of every rank's output come from my x -> sum_r w_r[2*rank + k]
    g_ag = np.array([sum(10.0 * r + 2 * rank + k for r in range(world)) for k in range(2)])
    check(F.all_gather_autograd, 2 * world, np.repeat(g_ag[:, None], 2, 1), "all_gather grad")
    # reduce_scatter of 2*world rows: my row k lands on rank k // 2 as its row k % 2
    xr = _rows(np.arange(2.0 * world), "float32", cols=2)
    w_rs = lambda r: np.arange(2) + 10.0 * r  # noqa: E731
    _, (g,), _ = p.value_and_grad(lambda t: (F.reduce_scatter_autograd(t) * _rows(w_rs(rank), "float32", 2))
                                  .sum(), [xr])
    want = np.array([w_rs(k // 2)[k % 2] for k in range(2 * world)])
    _close(p.tolist(g), np.repeat(want[:, None], 2, 1), "float32", "reduce_scatter grad")
    # uneven all_to_all with zero splits: the gradient of a sent row is the receiver's weight at its position
    m = split_matrix("partly_zero", world)
    send, recv = m[rank].tolist(), m[:, rank].tolist()
    xa = _rows(np.arange(sum(send), dtype=np.float64), "float32", cols=2)
    wa = _rows(np.arange(sum(recv)) + 100.0 * rank, "float32", cols=2)
    _, (g,), _ = p.value_and_grad(lambda t: (F.all_to_all_single_autograd(t, output_split_sizes=recv,
                                                                                input_split_sizes=send) * wa).sum(), [xa])
    want = [100.0 * j + m[:rank, j].sum() + k for j in range(world) for k in range(send[j])]
    _close(p.tolist(g), np.repeat(np.asarray(want, dtype=np.float64).reshape(-1, 1), 2, 1).reshape(-1, 2),
           "float32", "all_to_all grad")
    return True


# ---------------------------------------------------------------- factories, hooks, seeds, instrumentation
def factories():
    p = _p()
    assert p.tolist(p.arange(5)) == [0, 1, 2, 3, 4] and p.dtype_name(p.arange(3).dtype) == "int64"
    assert p.tolist(p.arange(0)) == []
    assert p.tolist(p.zeros((2, 2), dtype="int32")) == [[0, 0], [0, 0]]
    assert tuple(p.zeros((0, 4)).shape) == (0, 4) and tuple(p.empty((3, 0)).shape) == (3, 0)
    assert tuple(p.empty((2, 5), dtype="bfloat16").shape) == (2, 5)
    a, b = p.tensor([[1.0, 2.0]]), p.zeros((0, 2))
    assert p.tolist(p.cat([a, b, a])) == [[1.0, 2.0], [1.0, 2.0]]
    assert p.tolist(p.cat([p.tensor([[1.0], [2.0]]), p.tensor([[3.0], [4.0]])], dim=1)) == [[1.0, 3.0], [2.0, 4.0]]
    for name in ("bool", "int32", "int64", "float16", "bfloat16", "float32", "float64"):
        assert p.dtype_name(p.dtype(name)) == name
        assert p.dtype_name(p.zeros((1,), dtype=name).dtype) == name
    assert p.tolist(p.tensor([3, 4], dtype="int64")) == [3, 4]
    try:
        p.dtype("float8")
    except ValueError as e:
        assert "float8" in str(e) and "float32" in str(e)
    else:
        raise AssertionError("unknown dtype name accepted")
    return True


def count_calls():
    p = _p()
    x = p.zeros((p.get_world_size(), 2))
    with p.count_calls() as outer:
        p.all_reduce(x)
        with p.count_calls() as inner:
            p.all_to_all_single(x)
            p.tolist(x)
    assert dict(inner) == {"all_to_all_single": 1, "host_sync": 1}, dict(inner)
    assert dict(outer) == {"all_reduce": 1, "all_to_all_single": 1, "host_sync": 1}, dict(outer)
    # payload bytes: all_reduce hands over all of x (world rows of 2 float32); all_to_all sends one row to each peer
    world = p.get_world_size()
    assert outer.bytes["all_reduce"] == 8 * world and outer.bytes["host_sync"] == 0, dict(outer.bytes)
    assert inner.bytes["all_to_all_single"] == outer.bytes["all_to_all_single"] == 8 * (world - 1), dict(inner.bytes)
    # uneven: rank r sends r + j + 1 rows of 3 bfloat16 to rank j; only the rows for peers count
    rank = p.get_rank()
    send = [rank + j + 1 for j in range(world)]
    recv = [i + rank + 1 for i in range(world)]
    with p.count_calls() as calls, p.profile_range("hyper_parallel.test_range"):
        p.all_to_all_single(p.zeros((sum(send), 3), dtype="bfloat16"), output_split_sizes=recv, input_split_sizes=send)
        p.broadcast(p.zeros((5,), dtype="int32"), src=0)
    assert calls.bytes["all_to_all_single"] == 6 * (sum(send) - send[rank]), dict(calls.bytes)
    assert calls.bytes["broadcast"] == 20 and calls["broadcast"] == 1, dict(calls.bytes)
    return True


def value_and_grad_with_params():
    p = _p()
    w = p.Parameter(p.tensor([1.0, 2.0, 3.0]), requires_grad=True) if p.name != "mindspore" else \
        p.Parameter(p.tensor([1.0, 2.0, 3.0]), name="w")
    x = p.tensor([4.0, 5.0, 6.0])
    value, (gx,), (gw,) = p.value_and_grad(lambda t: (t * w * t).sum(), [x], [w])
    assert abs(float(p.tolist(value)) - (16 + 50 + 108)) < 1e-4
    _close(p.tolist(gx), [8.0, 20.0, 36.0], "float32", "d/dx")
    _close(p.tolist(gw), [16.0, 25.0, 36.0], "float32", "d/dw")
    return True


def hooks():
    p = _p()
    module = _scale_module(p, 3.0)
    seen = []
    pre = p.register_forward_pre_hook(module, lambda m, args: (args[0] + 1,))
    post = p.register_forward_hook(module, lambda m, args, out: seen.append(p.tolist(out)) or out * 10)
    out = module(p.tensor([1.0, 2.0]))
    assert p.tolist(out) == [60.0, 90.0] and seen == [[6.0, 9.0]], (p.tolist(out), seen)
    pre.remove()
    post.remove()
    assert p.tolist(module(p.tensor([1.0, 2.0]))) == [3.0, 6.0]
    return True


def _scale_module(p, factor: float):
    if p.name == "mindspore":
        import mindspore

        class Scale(mindspore.nn.Cell):
            def construct(self, x):
                return x * factor
    else:
        import torch

        class Scale(torch.nn.Module):
            def forward(self, x):
                return x * factor
    return Scale()


def manual_seed():
    p = _p()
    draws = []
    for _ in range(2):
        p.manual_seed(1234)
        draws.append(_random(p))
    assert draws[0] == draws[1]
    return True


def _random(p):
    if p.name == "mindspore":
        import mindspore

        return mindspore.ops.randn(4).asnumpy().tolist()
    import torch

    return torch.randn(4).tolist()
