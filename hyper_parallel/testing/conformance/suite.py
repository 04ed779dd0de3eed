"""The conformance suite as data: every case, the world sizes it runs at, and how its per-rank results are checked.

One list serves both entries: the shipped runner (:func:`hyper_parallel.testing.run_conformance`, ``python -m
hyper_parallel.testing.conformance``) and this project's pytest entry (``tests/test_conformance.py``), so both run
exactly the same cases.

>>> [c.name for c in conformance_cases()][:3]   # doctest: +SKIP
['identity', 'barrier_blocks', 'all_reduce/int64']
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from hyper_parallel.testing.conformance import collectives as c
from hyper_parallel.testing.conformance import errors as e
from hyper_parallel.testing.conformance import local

#: World sizes the cases support: the expected values are exact (bfloat16 included) up to 4 ranks.
WORLD_SIZES = (2, 3, 4)
#: The dtypes every collective case runs with.
DTYPES = ("int64", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case: a module-level function run on every rank of a world.

    Attributes:
        name: unique name, ``member`` or ``member/variant`` (e.g. ``all_reduce/int64``).
        fn: the function every rank runs (importable by the workers).
        args: its positional arguments (picklable).
        world_sizes: the world sizes it runs at; ``None`` means every size in :data:`WORLD_SIZES`.
        check: ``check(per_rank_results, nproc)`` run in the parent on the gathered results; raises
            ``AssertionError`` on a mismatch.
        world_survives: after the case, prove the world still works (a float32 ``all_reduce`` on every rank): for
            cases that must raise before anything is sent.
    """

    name: str
    fn: Callable
    args: tuple = ()
    world_sizes: tuple[int, ...] | None = None
    check: Callable[[list, int], None] | None = None
    world_survives: bool = False

    def runs_at(self, nproc: int) -> bool:
        """Whether the case applies to a world of ``nproc`` ranks."""
        return nproc in (WORLD_SIZES if self.world_sizes is None else self.world_sizes)

    def run(self, world, timeout_s: float = 120.0) -> list:
        """Run the case on every rank of ``world`` (a started :class:`~hyper_parallel.testing.World`).

        Args:
            world: the world to run on.
            timeout_s: seconds each step may take before the world is stopped (a hung collective).

        Returns:
            The per-rank results, in rank order.

        Raises:
            RankError: the case raised on some rank (each failing rank's traceback is in the message).
            WorldTimeout: some rank did not answer within ``timeout_s``.
            AssertionError: ``check`` rejected the gathered results.
        """
        results = world.run(self.fn, *self.args, timeout_s=timeout_s)
        if self.check is not None:
            self.check(results, world.nproc)
        if self.world_survives:
            world.run(c.all_reduce, "float32", timeout_s=timeout_s)
        return results


def _check_identity(results: list, nproc: int) -> None:
    want = [(r, nproc, r, nproc, list(range(nproc))) for r in range(nproc)]
    assert results == want, f"(rank, world size, group rank, group size, group ranks) per rank: {results} != {want}"


def _check_rows_received(pattern: str, results: list, nproc: int) -> None:
    want = int(c.split_matrix(pattern, nproc).sum())
    assert sum(results) == want, f"rows received per rank {results} sum to {sum(results)}, not {want}"


def conformance_cases() -> list[Case]:
    """Every case of the suite, in run order (names are unique).

    Returns:
        The cases: identity and barrier, the five collectives in every dtype (``all_to_all_single`` with even,
        uneven, partly-zero and all-zero splits, sync and async), groups of a 2x2 mesh, the gradients of the
        differentiable collectives, the local members, and the bad-input checks.
    """
    cases = [Case("identity", c.identity, check=_check_identity), Case("barrier_blocks", c.barrier_blocks)]
    for member, fn in (("all_reduce", c.all_reduce), ("all_gather_into_tensor", c.all_gather),
                       ("reduce_scatter_tensor", c.reduce_scatter), ("broadcast", c.broadcast)):
        cases += [Case(f"{member}/{dtype}", fn, (dtype,)) for dtype in DTYPES]
    cases.append(Case("large_reduce_and_gather", c.large_reduce_and_gather))
    cases += [Case(f"all_to_all_single/{pattern}/{dtype}", c.all_to_all, (pattern, dtype),
                   check=functools.partial(_check_rows_received, pattern))
              for pattern in c.SPLIT_PATTERNS for dtype in DTYPES]
    cases += [Case(f"all_to_all_single_async/{pattern}", c.all_to_all, (pattern, "float32", True))
              for pattern in ("uneven", "partly_zero")]
    cases.append(Case("mesh_groups_2x2", c.mesh_groups_2x2, world_sizes=(4,)))
    cases.append(Case("group_order", c.group_order))
    cases.append(Case("gradients", c.gradients))
    cases += [Case(f"local/{fn.__name__}", fn)
              for fn in (local.factories, local.count_calls, local.value_and_grad_with_params, local.hooks,
                         local.manual_seed, local.modules, local.autograd_function, local.kernels,
                         local.host_and_state)]
    cases += [Case(f"bad_input/{fn.__name__}", fn, world_survives=True) for fn in (e.bad_splits, e.bad_arguments)]
    cases.append(Case("not_a_member", e.not_a_member, world_sizes=(3, 4)))
    return cases
