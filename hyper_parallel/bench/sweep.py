"""What a bench run measures and how one cell is timed: the sweeps, the seeded counts, the repeat plan.

Timing: one warm-up call (each cell checks it against its reference), then repeats of a batch of calls sized from
the warm-up; a repeat's time is its batch's time per call, and a cell reports the median repeat. The number of
repeats shrinks for slow cells (at least 3) so that the default run stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

__all__ = ["ALIGN", "HIDDEN", "LOCAL_EXPERTS", "BACKENDS", "SEED", "Sweep", "DEFAULT", "QUICK", "counts_for",
           "measure", "timed_once", "sync_last"]

ALIGN = 8
"""Alignment of each expert's rows in the permute cells (what grouped GEMM kernels want)."""
HIDDEN = 128
"""Row width of the dispatch cells (float32)."""
LOCAL_EXPERTS = 4
"""Local experts per rank in the dispatch cells (``R * 4`` global experts)."""
BACKENDS = ("torch", "mindspore")
"""The backends the bench knows, in report order (the cross-framework ratios read ``mindspore / torch``)."""
SEED = 1234
"""Base seed of every cell's counts: each backend measures the same cells."""


class Sweep:
    """The cells one run measures.

    Args:
        permute_tokens: rows received, ``T``, of the permute cells.
        permute_layouts: ``(R, E)`` pairs of the permute cells.
        dispatch_nprocs: numbers of processes of the dispatch cells (the first ranks of one world).
        dispatch_tokens: rows each rank routes in the dispatch cells.
        max_repeats: repeats per cell (fewer for slow cells, never under 3).
        cell_budget_s: time a cell's repeats aim for.
    """

    def __init__(self, permute_tokens: Sequence[int], permute_layouts: Sequence[tuple[int, int]],
                 dispatch_nprocs: Sequence[int], dispatch_tokens: Sequence[int], max_repeats: int,
                 cell_budget_s: float):
        self.permute_tokens, self.permute_layouts = tuple(permute_tokens), tuple(permute_layouts)
        self.dispatch_nprocs, self.dispatch_tokens = tuple(dispatch_nprocs), tuple(dispatch_tokens)
        self.max_repeats, self.cell_budget_s = max_repeats, cell_budget_s

    def permute_cells(self) -> list[tuple[int, int, int]]:
        """Every ``(T, R, E)`` permute cell, layout by layout."""
        return [(t, r, e) for (r, e) in self.permute_layouts for t in self.permute_tokens]

    def timing_args(self) -> dict:
        """What the workers need of the sweep to plan their repeats (a plain dict: it is pickled to them)."""
        return {"max_repeats": self.max_repeats, "cell_budget_s": self.cell_budget_s}


DEFAULT = Sweep(permute_tokens=(1024, 8192, 65536), permute_layouts=((2, 4), (4, 8), (8, 16)),
                dispatch_nprocs=(2, 4), dispatch_tokens=(1024, 4096, 16384), max_repeats=7, cell_budget_s=1.5)
"""The default sweep (about 3 minutes on 2 cores with both backends)."""
QUICK = Sweep(permute_tokens=(1024, 8192), permute_layouts=((2, 4), (4, 8)),
              dispatch_nprocs=(2,), dispatch_tokens=(512, 2048), max_repeats=3, cell_budget_s=0.3)
"""``--quick``: a small sweep for tests and smoke runs."""


def counts_for(num_rows: int, num_blocks: int, seed: int) -> list[int]:
    """``num_blocks`` seeded, uneven, non-negative counts summing to ``num_rows`` (a skewed router's output)."""
    rng = random.Random(seed)
    weights = [rng.random() ** 2 + 0.05 for _ in range(num_blocks)]
    total = sum(weights)
    counts = [int(num_rows * w / total) for w in weights]
    counts[max(range(num_blocks), key=weights.__getitem__)] += num_rows - sum(counts)
    return counts


def measure(fns: dict, warm_s: dict, timing_args: dict, barrier: Callable | None = None) -> dict:
    """Per-call seconds of each repeat of every function in ``fns``.

    The functions' repeats are interleaved, so a change of background load hits them alike. Each repeat times a
    batch of calls of about 5 ms or more (sized from the warm-up time ``warm_s[name]``), then waits for the last
    result; the number of repeats keeps the cell near its budget, between 3 and ``max_repeats``.

    Args:
        fns: the functions to time, by name; each returns a tensor (waited for after each batch).
        warm_s: each function's warm-up time in seconds, by name.
        timing_args: :meth:`Sweep.timing_args`.
        barrier: called before every batch; ranks that time collectives together must then all plan from the same
            ``warm_s``, or they would issue different numbers of calls.

    Returns:
        ``{name: [seconds per call of each repeat]}``.
    """
    warm_s = {k: max(v, 1e-6) for k, v in warm_s.items()}
    number = {k: max(1, min(50, int(0.005 / w))) for k, w in warm_s.items()}
    round_s = sum(warm_s[k] * number[k] for k in fns)
    repeats = max(3, min(timing_args["max_repeats"], int(timing_args["cell_budget_s"] / round_s)))
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if barrier is not None:
                barrier()
            t0 = time.perf_counter()
            for _ in range(number[name]):
                out = fn()
            sync_last(out)
            times[name].append((time.perf_counter() - t0) / number[name])
    return times


def timed_once(fn: Callable) -> float:
    """Seconds of one call of ``fn``, its result waited for."""
    t0 = time.perf_counter()
    sync_last(fn())
    return time.perf_counter() - t0


def sync_last(x) -> None:
    """Wait for ``x`` (frameworks that queue ops, as MindSpore's PyNative may, finish them in order)."""
    from hyper_parallel._select import get_platform

    get_platform().tolist(x.reshape(-1)[-1:])
