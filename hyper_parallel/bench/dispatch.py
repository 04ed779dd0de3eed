"""The dispatch+combine benchmark: the EP token exchange against the raw all-to-all it is built on.

:func:`~hyper_parallel.expert_parallel.dispatch.token_dispatch` +
:func:`~hyper_parallel.expert_parallel.dispatch.token_combine` (counts all-to-all, one host sync, token all-to-all,
permute, unpermute, token all-to-all back) against two raw ``all_to_all_single`` calls that move the same rows with
the same split sizes; on the first ranks of one world (the others idle), swept over the rows each rank routes. A
repeat's time is the slowest rank's, every repeat starting at a barrier.
"""

from __future__ import annotations

from hyper_parallel.bench.sweep import HIDDEN, LOCAL_EXPERTS, SEED, counts_for, measure, timed_once

__all__ = ["dispatch_cell"]

_GROUPS: dict = {}
"""The group of the first ``nproc`` ranks, per ``nproc``: created once per worker process, by every rank."""


def dispatch_cell(nproc: int, tokens: int, timing_args: dict) -> dict | None:
    """One dispatch cell, run in a worker on the first ``nproc`` ranks (the others return None): per-repeat seconds
    of dispatch+combine and of the raw exchange.

    Args:
        nproc: the ranks taking part (the first ``nproc`` of the world).
        tokens: rows each rank routes, split over ``nproc * LOCAL_EXPERTS`` experts by seeded uneven counts.
        timing_args: :meth:`~hyper_parallel.bench.sweep.Sweep.timing_args`.

    Raises:
        AssertionError: dispatch+combine did not bring the rows back unchanged (checked before timing).
    """
    from hyper_parallel._select import get_platform
    from hyper_parallel.expert_parallel.dispatch import token_combine, token_dispatch

    p = get_platform()
    if nproc not in _GROUPS:  # every rank of the world creates the group, once per process
        _GROUPS[nproc] = p.new_group(range(nproc))
    group = _GROUPS[nproc]
    rank = p.get_rank()
    if rank >= nproc:
        return None
    R, E = nproc, LOCAL_EXPERTS
    counts = [counts_for(tokens, R * E, SEED + 31 * r + tokens) for r in range(R)]
    splits = [[sum(c[j * E:(j + 1) * E]) for j in range(R)] for c in counts]  # splits[src][dst]
    in_splits = splits[rank]
    out_splits = [splits[src][rank] for src in range(R)]
    x = (p.arange(tokens * HIDDEN, dtype="float32") * (1.0 / 1024)).reshape(tokens, HIDDEN)
    counts_dev = p.tensor(counts[rank], dtype="int64")

    def dispatch_combine():
        d = token_dispatch(x, counts_dev, group, align=1)
        return token_combine(d.routed_input, d.meta)

    def raw():
        y, _ = p.all_to_all_single(x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
        return p.all_to_all_single(y, output_split_sizes=in_splits, input_split_sizes=out_splits, group=group)[0]

    back = dispatch_combine()  # warm-up and check: the rows come back where they started
    err = p.tolist((back - x).abs().max().reshape(1))[0]
    if err != 0:
        raise AssertionError(f"dispatch+combine did not return the rows unchanged (max abs diff {err})")
    fns = {"dispatch_combine": dispatch_combine, "raw_all_to_all": raw}
    warm = [timed_once(fn) for fn in fns.values()]
    # every rank must issue the same collectives: all plan from the slowest rank's warm-up times
    warm = p.tolist(p.all_reduce(p.tensor(warm, dtype="float32"), "max", group=group))
    return measure(fns, dict(zip(fns, warm)), timing_args, barrier=lambda: p.barrier(group))
