"""Cases for ``tests/test_world_harness.py``: small functions that exercise the :class:`~hyper_parallel.testing.World`
harness itself (results, failures, hangs, dead workers) rather than the platform contract.

They are module-level so the workers can unpickle them by reference.
"""

from __future__ import annotations

import os

from hyper_parallel import get_platform


def ok(x):
    """Return ``(rank, x * 2)``: proves each rank ran the case with the shipped argument."""
    return get_platform().get_rank(), x * 2


def with_kwargs(a, *, b=0):
    """Return ``(rank, a, b)``: proves positional and keyword arguments both reach the ranks."""
    return get_platform().get_rank(), a, b


def rank_sum():
    """All-reduce each rank's id: ``sum(range(world))`` on every rank proves the process group works."""
    p = get_platform()
    return p.tolist(p.all_reduce(p.tensor([float(p.get_rank())])))[0]


def pid():
    """The worker's process id, so tests can check that stopped workers are really gone."""
    return os.getpid()


def raise_on_rank(r):
    """Raise ``ValueError("boom on rank r")`` on rank ``r`` only; every other rank returns its rank."""
    rank = get_platform().get_rank()
    if rank == r:
        raise ValueError(f"boom on rank {r}")
    return rank


def hang_on_rank(r):
    """Rank ``r`` enters an all-reduce that no other rank joins, so it blocks; the others return at once."""
    p = get_platform()
    if p.get_rank() == r:
        p.all_reduce(p.zeros((1,)))
    return p.get_rank()


def exit_on_rank(r):
    """Rank ``r``'s worker process dies without replying (as after a segfault); the others return."""
    rank = get_platform().get_rank()
    if rank == r:
        os._exit(7)
    return rank


def lingering_exit_on_rank(r, linger_s):
    """Rank ``r`` closes its connection to the parent, lingers ``linger_s`` seconds, then dies; the others return.

    A dying process closes its sockets a few milliseconds before it can be reaped; this widens that window so a
    test can rely on it.
    """
    import gc
    import multiprocessing.connection as mpc
    import time

    rank = get_platform().get_rank()
    if rank == r:
        for obj in gc.get_objects():
            if isinstance(obj, mpc.Connection) and not obj.closed:
                obj.close()
        time.sleep(linger_s)
        os._exit(7)
    return rank
