"""Conformance cases for the collectives and process groups of the platform contract.

Each case runs on every rank of a :class:`~hyper_parallel.testing.World` and asserts real values. Expected values are
computed on the host from the rank and world size, never by the collective under test. The cases are
framework-neutral: they reach the backend only through :func:`~hyper_parallel.get_platform` and the contract, so
they run unchanged on a third-party adapter. The world sizes they support are listed in
:mod:`hyper_parallel.testing.conformance.suite`.
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
    """Identity members and the world group; returns ``(rank, world size, group rank, group size, group ranks)``."""
    p = _p()
    assert not type(p).__abstractmethods__, f"adapter misses {sorted(type(p).__abstractmethods__)}"
    assert isinstance(p.name, str) and p.name and p.name == p.name.strip().lower(), \
        f"name must be the lower-case backend name HYPER_PARALLEL_PLATFORM selects, got {p.name!r}"
    assert isinstance(p.device_type, str) and p.device_type, f"device_type: got {p.device_type!r}"
    assert isinstance(p.dist_backend, str) and p.dist_backend, f"dist_backend: got {p.dist_backend!r}"
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


def group_order():
    """A group's rank order is the order its ranks were given, also when it is not ascending: a group over the
    world in reverse order gathers the last rank's rows first and scatters its first slice to the last rank."""
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    order = list(reversed(range(world)))
    group = p.new_group(order)
    me = p.group_rank(group)
    assert me == world - 1 - rank and p.group_ranks(group) == order, (me, p.group_ranks(group))
    x = _rows(np.array([rank + 1.0]), "float32")
    _close(p.tolist(p.all_gather_into_tensor(x, group=group)), [[r + 1.0] * 3 for r in order], "float32",
           "gather in the group's order")
    full = _rows(np.arange(world, dtype=np.float64) + 10.0 * rank, "float32")
    want = [[sum(10.0 * r for r in range(world)) + world * me] * 3]
    _close(p.tolist(p.reduce_scatter_tensor(full, group=group)), want, "float32", "scatter in the group's order")
    # member i sends one row to member j holding 10*i + j
    sent = _rows(np.array([10.0 * me + j for j in range(world)]), "float32")
    out, _ = p.all_to_all_single(sent, output_split_sizes=[1] * world, input_split_sizes=[1] * world, group=group)
    _close(p.tolist(out), [[10.0 * i + me] * 3 for i in range(world)], "float32", "all_to_all in the group's order")
    return True


# ---------------------------------------------------------------- collectives
def all_reduce(dtype: str):
    """``all_reduce`` with sum, max and (floating dtypes) avg; the input stays unchanged."""
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
    """``all_gather_into_tensor``: two rows per rank, concatenated in rank order."""
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    out = p.all_gather_into_tensor(_rows(np.array([10.0 * rank, 10.0 * rank + 1]), dtype))
    want = [[10.0 * r + i] * 3 for r in range(world) for i in range(2)]
    _close(p.tolist(out), want, dtype, "all_gather_into_tensor")
    return True


def large_reduce_and_gather():
    """``all_reduce`` (sum, max, avg) and ``all_gather_into_tensor`` of 256 KB per member, beyond the size an adapter
    may handle another way (the torch adapter runs up to 64 KB on gloo as one all-to-all); integer values, so every
    summation order gives the same result."""
    p = _p()
    rank, world = p.get_rank(), p.get_world_size()
    n = 1 << 16  # float32: 256 KB
    base = np.arange(n, dtype=np.float64) % 1000
    x = p.tensor((base + rank).tolist(), dtype="float32")
    total = world * base + sum(range(world))
    assert p.tolist(p.all_reduce(x)) == total.tolist(), "sum"
    assert p.tolist(p.all_reduce(x, op="max")) == (base + world - 1).tolist(), "max"
    assert p.tolist(p.all_reduce(x, op="avg")) == (total / world).astype(np.float32).tolist(), "avg"
    gathered = p.tolist(p.all_gather_into_tensor(x))
    assert gathered == np.concatenate([base + r for r in range(world)]).tolist(), "all_gather_into_tensor"
    return True


def reduce_scatter(dtype: str):
    """``reduce_scatter_tensor`` with sum, max and (non-integer dtypes) avg: each rank keeps its two rows."""
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
    """``broadcast`` from the last rank (a global rank other than 0)."""
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
    raise ValueError(f"split pattern must be one of {list(SPLIT_PATTERNS)}, got {pattern!r}")


def all_to_all(pattern: str, dtype: str, async_op: bool = False):
    """``all_to_all_single`` with the split sizes of ``pattern`` (see :func:`split_matrix`), sync or async.

    Returns:
        The number of rows this rank received (the runner checks their sum against the split matrix).
    """
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
    w_rs = lambda r: np.arange(2) + 10.0 * r
    _, (g,), _ = p.value_and_grad(lambda t: (F.reduce_scatter_autograd(t) * _rows(w_rs(rank), "float32", 2))
                                  .sum(), [xr])
    want = np.array([w_rs(k // 2)[k % 2] for k in range(2 * world)])
    _close(p.tolist(g), np.repeat(want[:, None], 2, 1), "float32", "reduce_scatter grad")
    # uneven all_to_all with zero splits: the gradient of a sent row is the receiver's weight at its position
    m = split_matrix("partly_zero", world)
    send, recv = m[rank].tolist(), m[:, rank].tolist()
    xa = _rows(np.arange(sum(send), dtype=np.float64), "float32", cols=2)
    wa = _rows(np.arange(sum(recv)) + 100.0 * rank, "float32", cols=2)

    def exchanged(t):
        return (F.all_to_all_single_autograd(t, output_split_sizes=recv, input_split_sizes=send) * wa).sum()

    _, (g,), _ = p.value_and_grad(exchanged, [xa])
    want = [100.0 * j + m[:rank, j].sum() + k for j in range(world) for k in range(send[j])]
    _close(p.tolist(g), np.repeat(np.asarray(want, dtype=np.float64).reshape(-1, 1), 2, 1).reshape(-1, 2),
           "float32", "all_to_all grad")
    return True
