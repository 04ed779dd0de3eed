"""The permutation benchmark: the vectorized index build against a per-(expert, rank) loop.

:func:`~hyper_parallel.expert_parallel.permute.build_permute_indices` (no loop over experts or ranks) against
:func:`permute_indices_loop`, a loop like the CPU reference of torchtitan's ``generate_permute_indices``; swept over
the rows received ``T`` and the EP layout ``R x E`` (ranks x local experts), alignment :data:`ALIGN`. Both get the
counts already on the host, so the ratio is the cost of the loop of ``R * E`` slice writes against a fixed sequence
of whole-tensor ops. A cell runs on rank 0 while the other ranks of its world wait idle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hyper_parallel.bench.sweep import ALIGN, SEED, counts_for, measure

__all__ = ["permute_indices_loop", "permute_cell"]


def permute_indices_loop(host_counts_RE: Sequence[int], num_ranks: int, num_local_experts: int, align: int = 1):
    """The expert-major slot -> rank-major row map (``source_row_P``), built with a per-(expert, rank) loop.

    The reference the vectorized build is measured against: the shape of torchtitan's CPU ``fill_indices_cpu``
    (one ``arange`` written into a slice per (expert, rank) block), on the platform's tensors, with the counts
    given as host ints like the vectorized build gets them. Padding slots hold ``T`` (the appended zero row), as in
    :class:`~hyper_parallel.expert_parallel.permute.PermuteIndices`.

    Args:
        host_counts_RE: rows from rank r for local expert e, rank-major, as host ints.
        num_ranks: R.
        num_local_experts: E.
        align: each expert's group of slots is padded to a multiple of this.
    """
    from hyper_parallel._select import get_platform
    from hyper_parallel.expert_parallel.permute import aligned_counts

    p = get_platform()
    R, E = num_ranks, num_local_experts
    counts = [int(c) for c in host_counts_RE]
    per_expert = aligned_counts([sum(counts[e::E]) for e in range(E)], align)
    T = sum(counts)
    src_start = [0] * (R * E)
    for i in range(1, R * E):
        src_start[i] = src_start[i - 1] + counts[i - 1]
    out = p.zeros((sum(per_expert),), dtype="int64") + T
    write = 0
    for e in range(E):
        w = write
        for r in range(R):
            n = counts[r * E + e]
            if n:
                out[w:w + n] = p.arange(n) + src_start[r * E + e]
            w += n
        write += per_expert[e]
    return out


def permute_cell(tokens: int, ranks: int, experts: int, timing_args: dict) -> dict | None:
    """One permute cell, run in a worker: per-repeat seconds of both builds on rank 0 (the others return None).

    Args:
        tokens: T, the rows received.
        ranks: R.
        experts: E, the local experts.
        timing_args: :meth:`~hyper_parallel.bench.sweep.Sweep.timing_args`.

    Raises:
        AssertionError: the two builds disagree (checked on the warm-up call, before anything is timed).
    """
    from hyper_parallel._select import get_platform
    from hyper_parallel.expert_parallel.permute import build_permute_indices

    p = get_platform()
    if p.get_rank() != 0:
        return None
    host = counts_for(tokens, ranks * experts, SEED + tokens + 7 * ranks + experts)
    dev = p.tensor(host, dtype="int64")
    fns = {"vectorized": lambda: build_permute_indices(dev, host, ranks, experts, align=ALIGN).source_row_P,
           "loop": lambda: permute_indices_loop(host, ranks, experts, ALIGN)}
    warm, got = {}, {}
    for name, fn in fns.items():  # warm-up, timed for the plan, and checked: both build the same indices
        t0 = time.perf_counter()
        got[name] = p.tolist(fn())
        warm[name] = time.perf_counter() - t0
    if got["vectorized"] != got["loop"]:
        raise AssertionError(f"vectorized and loop permutations differ at T={tokens} R={ranks} E={experts}")
    return measure(fns, warm, timing_args)
