"""The redistribution engine: move a local shard from one placement list to another, one mesh axis at a time.

Each transition uses ONE collective on the axis's group (or none):

| from -> to      | forward                         | backward (gradient is laid out like the output)  |
|-----------------|---------------------------------|--------------------------------------------------|
| Shard(d) -> R   | all_gather along d              | local chunk                                      |
| R -> Shard(d)   | local chunk (no communication)  | all_gather along d                               |
| Partial -> R    | all_reduce                      | identity                                         |
| Partial -> S(d) | reduce_scatter along d          | all_gather along d                               |
| S(i) -> S(j)    | all_to_all                      | all_to_all back                                  |

``StridedShard(d, s)`` (SS) is ``Shard(d)`` of the tensor whose dim ``d`` is reordered so that each rank's rows are
one contiguous block (view the dim as ``[s, n, m]``, reorder it to ``[n, s, m]``). That local reordering, on a
tensor holding the whole dim ``d``, turns every Shard transition above into the SS one with the same collective:

| from -> to          | forward                                              | backward               |
|---------------------|------------------------------------------------------|------------------------|
| SS(d) -> R          | all_gather along d, then put the blocks back in order | local pick             |
| R -> SS(d)          | local pick of this rank's rows (no communication)    | all_gather + reorder   |
| Partial -> SS(d)    | reorder, then reduce_scatter along d                 | all_gather + reorder   |
| S/SS(i) -> S/SS(j)  | reorder j, all_to_all, reorder i back (i != j)       | all_to_all back        |
| S/SS(d) -> S/SS(d)  | through Replicate (two steps: all_gather, local pick) | the same, reversed     |

SS needs the dim's size divisible by ``s * n`` (:func:`check_placements_fit`), so its pieces are never padded.

The backward column is not written separately: the gradient of a redistribution from ``src`` to ``dst`` is the
redistribution of the output gradient from ``dst`` to ``src``, with Partial read as Replicate on both sides (a
gradient is never left partial). So :func:`redistribute_local` (plain collectives) is the whole engine and
:func:`redistribute` wraps it once with the platform's autograd primitive.

Uneven shards follow ``torch.chunk``: collectives that need equal pieces pad to the chunk step and trim after.
Only dim 0 is ever exchanged; other dims are swapped to the front and back (``swapaxes``).
"""

from __future__ import annotations

from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.placement import Placement, Replicate, StridedShard, chunk_offsets, chunk_sizes


def grad_placements_of(placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """Placements of a gradient flowing back to a tensor with ``placements``: Partial becomes Replicate."""
    return tuple(Replicate() if p.is_partial() else p for p in placements)


def check_placements_fit(global_shape: Sequence[int], mesh, placements: Sequence[Placement]) -> None:
    """Check that every ``StridedShard`` divides its dim evenly: size divisible by ``split_factor * axis size``.

    Raises:
        ValueError: naming the placement, the mesh axis and its size, the dim's size and the divisor needed.
    """
    for axis, p in enumerate(placements):
        if p.is_strided_shard():
            n, size = mesh.size(axis), global_shape[p.dim]
            if size % (p.split_factor * n):
                raise ValueError(
                    f"{p} on mesh axis {axis} (size {n}) needs tensor dim {p.dim}'s size divisible by split_factor * "
                    f"axis size = {p.split_factor} * {n} = {p.split_factor * n}; got size {size} (global shape "
                    f"{list(global_shape)}). Uneven StridedShard chunks are not supported: use a split_factor and "
                    "mesh size that divide the dim, or Shard(dim)")


def local_shape(global_shape: Sequence[int], mesh, placements: Sequence[Placement]) -> tuple[int, ...]:
    """Shape of this rank's shard of a tensor of ``global_shape`` laid out by ``placements`` on ``mesh``.

    Raises:
        ValueError: a ``StridedShard`` does not divide its dim (see :func:`check_placements_fit`).
    """
    check_placements_fit(global_shape, mesh, placements)
    shape = list(global_shape)
    for axis, p in enumerate(placements):
        if p.is_shard():
            shape[p.dim] = chunk_sizes(global_shape[p.dim], mesh.size(axis))[mesh.get_local_rank(axis)]
        elif p.is_strided_shard():
            shape[p.dim] = global_shape[p.dim] // mesh.size(axis)
    return tuple(shape)


def plan_steps(src: Sequence[Placement], dst: Sequence[Placement]) -> list[tuple[int, Placement, Placement]]:
    """Order the per-axis transitions so no step shards a tensor dim that another axis still shards.

    Axes going to Replicate go first, and so do axes that move between two shardings of the SAME dim (such as
    ``Shard(0) -> StridedShard(0, 2)``: they pass through Replicate); then each axis whose target dim is free moves
    directly; a cycle such as ``[S(0), S(1)] -> [S(1), S(0)]`` is broken by taking one axis through Replicate.
    """
    state, steps = list(src), []

    def move(axis: int, target: Placement) -> None:
        steps.append((axis, state[axis], target))
        state[axis] = target

    for axis, (a, b) in enumerate(zip(src, dst)):
        if b.is_partial() and a != b:
            raise ValueError(f"redistribute to Partial is not supported (mesh axis {axis}: {a} -> {b}); "
                             "valid targets are Shard(dim), StridedShard(dim, split_factor) and Replicate()")
        if a != b and (b.is_replicate() or (a.is_shard_like() and b.is_shard_like() and a.dim == b.dim)):
            move(axis, Replicate())
    pending = [axis for axis in range(len(dst)) if state[axis] != dst[axis]]
    while pending:
        taken = {q.dim: axis for axis, q in enumerate(state) if q.is_shard_like()}
        ready = [axis for axis in pending if taken.get(dst[axis].dim, axis) == axis]
        if ready:
            move(ready[0], dst[ready[0]])
            pending.remove(ready[0])
        else:
            blocker = taken[dst[pending[0]].dim]
            move(blocker, Replicate())
    return steps


def redistribute_local(x, mesh, src: Sequence[Placement], dst: Sequence[Placement], global_shape: Sequence[int]):
    """Return this rank's shard under ``dst`` given its shard ``x`` under ``src`` (no autograd).

    Raises:
        ValueError: a ``StridedShard`` of ``src`` or ``dst`` does not divide its dim.
    """
    check_placements_fit(global_shape, mesh, src)
    check_placements_fit(global_shape, mesh, dst)
    for axis, a, b in plan_steps(src, dst):
        group = mesh.get_group(axis)
        n, k = mesh.size(axis), mesh.get_local_rank(axis)
        if a.is_shard_like() and b.is_replicate():
            x = _unblock(_gather(x, a.dim, global_shape[a.dim], group, n), a, n)
        elif a.is_replicate() and b.is_shard():
            x = _chunk(x, b.dim, global_shape[b.dim], n, k)
        elif a.is_replicate() and b.is_strided_shard():
            x = _pick_strided(x, b, n, k)
        elif a.is_partial() and b.is_replicate():
            x = get_platform().all_reduce(x, "sum", group=group)
        elif a.is_partial() and b.is_shard_like():
            x = _reduce_scatter(_block(x, b, n), b.dim, global_shape[b.dim], group, n, k)
        else:  # Shard-like(i) -> Shard-like(j), i != j (plan_steps takes a same-dim move through Replicate)
            x = _unblock(_all_to_all(_block(x, b, n), a.dim, b.dim, global_shape, group, n, k), a, n)
    return x


def redistribute(x, mesh, src: Sequence[Placement], dst: Sequence[Placement], global_shape: Sequence[int]):
    """:func:`redistribute_local` with a gradient (see the module docstring)."""
    src, dst = tuple(src), tuple(dst)
    if src == dst:
        return x
    shape = tuple(global_shape)
    back_src, back_dst = grad_placements_of(dst), grad_placements_of(src)
    return get_platform().autograd_function(
        lambda t: redistribute_local(t, mesh, src, dst, shape),
        lambda g: redistribute_local(g, mesh, back_src, back_dst, shape),
    )(x)


# -------------------------------------------------------------------- one axis, one collective each
def _front(x, dim: int):
    """Swap ``dim`` with dim 0 (its own inverse)."""
    return x if dim == 0 else x.swapaxes(0, dim).contiguous()


def _pad_rows(x, rows: int):
    if x.shape[0] == rows:
        return x
    p = get_platform()
    pad = p.zeros((rows - x.shape[0], *x.shape[1:]), dtype=p.dtype_name(x.dtype), device=_device(x))
    return p.cat([x, pad])


def _device(x):
    return getattr(x, "device", None)


def _gather(x, dim: int, size: int, group, n: int):
    p = get_platform()
    sizes = chunk_sizes(size, n)
    step = max(sizes)
    gathered = p.all_gather_into_tensor(_pad_rows(_front(x, dim), step), group=group)
    if step * n != size:  # drop each rank's padding
        gathered = p.cat([gathered[j * step: j * step + sizes[j]] for j in range(n)])
    return _front(gathered, dim)


def _strided_rows(size: int, split_factor: int, n: int) -> tuple[int, int]:
    """(part length, per-rank piece length) of a dim of ``size`` under ``StridedShard(split_factor)`` on ``n``."""
    return size // split_factor, size // (split_factor * n)


def _pick_strided(x, pl: StridedShard, n: int, k: int):
    """Replicate -> StridedShard on a tensor holding the whole dim: rank ``k``'s piece of every part, in order."""
    rows = _front(x, pl.dim)
    part, m = _strided_rows(rows.shape[0], pl.split_factor, n)
    if m == 0:  # an empty dim: nothing to pick
        return x
    pieces = [rows[j * part + k * m: j * part + (k + 1) * m] for j in range(pl.split_factor)]
    return _front(pieces[0] if len(pieces) == 1 else get_platform().cat(pieces), pl.dim)


def _block(x, pl: Placement, n: int):
    """For a StridedShard ``pl``, reorder the whole dim ``pl.dim`` of ``x`` from ``[s, n, m]`` (parts of rank pieces)
    to ``[n, s, m]`` (each rank's rows one contiguous block, in rank order); identity for any other placement."""
    if not pl.is_strided_shard() or pl.split_factor == 1 or n == 1:
        return x
    rows = _front(x, pl.dim)
    part, m = _strided_rows(rows.shape[0], pl.split_factor, n)
    if m == 0:
        return x
    pieces = [rows[j * part + r * m: j * part + (r + 1) * m] for r in range(n) for j in range(pl.split_factor)]
    return _front(get_platform().cat(pieces), pl.dim)


def _unblock(x, pl: Placement, n: int):
    """The inverse of :func:`_block`: rank blocks ``[n, s, m]`` back to the tensor's order ``[s, n, m]``."""
    if not pl.is_strided_shard() or pl.split_factor == 1 or n == 1:
        return x
    rows = _front(x, pl.dim)
    s, m = pl.split_factor, rows.shape[0] // (pl.split_factor * n)
    if m == 0:
        return x
    pieces = [rows[r * s * m + j * m: r * s * m + (j + 1) * m] for j in range(s) for r in range(n)]
    return _front(get_platform().cat(pieces), pl.dim)


def _chunk(x, dim: int, size: int, n: int, k: int):
    start, length = chunk_offsets(size, n)[k], chunk_sizes(size, n)[k]
    return _front(_front(x, dim)[start: start + length], dim)


def _reduce_scatter(x, dim: int, size: int, group, n: int, k: int):
    p = get_platform()
    step = max(chunk_sizes(size, n))
    mine = p.reduce_scatter_tensor(_pad_rows(_front(x, dim), step * n), "sum", group=group)
    return _front(mine[: chunk_sizes(size, n)[k]], dim)


def _all_to_all(x, src_dim: int, dst_dim: int, global_shape: Sequence[int], group, n: int, k: int):
    """Shard(src_dim) -> Shard(dst_dim): send my rows' chunk ``j`` of ``dst_dim`` to rank ``j``, then stack what
    arrives along ``src_dim`` in rank order. Pieces travel flattened so any two dims and uneven sizes work."""
    p = get_platform()
    src_sizes = chunk_sizes(global_shape[src_dim], n)
    dst_sizes, dst_offsets = chunk_sizes(global_shape[dst_dim], n), chunk_offsets(global_shape[dst_dim], n)
    moved = _front(x, dst_dim)  # chunks of dst_dim are now row ranges
    pieces = [moved[dst_offsets[j]: dst_offsets[j] + dst_sizes[j]] for j in range(n)]
    sends = [_numel(piece.shape) for piece in pieces]
    flat = p.cat([piece.reshape(-1) for piece in pieces])
    # Block from rank i: shape of ``moved`` with dst_dim -> my chunk, src_dim -> rank i's chunk.
    block_shapes = []
    for i in range(n):
        shape = list(moved.shape)
        shape[0] = dst_sizes[k]
        shape[_swapped(src_dim, dst_dim)] = src_sizes[i]
        block_shapes.append(shape)
    recvs = [_numel(s) for s in block_shapes]
    out, _ = p.all_to_all_single(flat, output_split_sizes=recvs, input_split_sizes=sends, group=group)
    offsets = [sum(recvs[:i]) for i in range(n)]
    blocks = [out[offsets[i]: offsets[i] + recvs[i]].reshape(block_shapes[i]) for i in range(n)]
    return _front(p.cat(blocks, dim=_swapped(src_dim, dst_dim)), dst_dim)


def _swapped(dim: int, front: int) -> int:
    """Where ``dim`` sits after swapping ``front`` with dim 0."""
    return front if dim == 0 else (0 if dim == front else dim)


def _numel(shape) -> int:
    total = 1
    for s in shape:
        total *= int(s)
    return total

