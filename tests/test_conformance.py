"""The conformance suite: every contract member, on every selected backend, at 2 and 4 ranks.

The cases ship in :mod:`hyper_parallel.testing.conformance` so that a third-party adapter can run them without this
repository (``python -m hyper_parallel.testing.conformance --backend NAME``); this module is the project's pytest
entry for the same list, :func:`~hyper_parallel.testing.conformance.suite.conformance_cases`, run on the session's
shared worlds (``tests/conftest.py``). Test ids read ``test_case[<backend>-x<ranks>-<case>]``.
"""

from __future__ import annotations

import pytest

from hyper_parallel.testing.conformance.suite import WORLD_SIZES, conformance_cases

NPROCS = (2, 4)
CASES = conformance_cases()


@pytest.mark.parametrize(
    "nproc,case", [pytest.param(n, case, id=f"x{n}-{case.name}") for n in NPROCS for case in CASES if case.runs_at(n)])
def test_case(worlds, backend, nproc, case):
    case.run(worlds.get(backend, nproc))


def test_the_suite_covers_every_collective_dtype_and_split_pattern():
    """The list both entries run: what each member is checked with, and at which world sizes."""
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) == 44
    for member in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
        assert [n for n in names if n.startswith(member + "/")] == [f"{member}/{d}" for d in ("int64", "float32",
                                                                                              "bfloat16")]
    assert sum(n.startswith("all_to_all_single/") for n in names) == 4 * 3
    assert {n: c.world_sizes for n, c in zip(names, CASES) if c.world_sizes} == {
        "mesh_groups_2x2": (4,), "not_a_member": (3, 4)}
    assert {"local/modules", "local/autograd_function", "local/kernels", "local/host_and_state",
            "large_reduce_and_gather"} <= set(names)
    assert [sum(c.runs_at(n) for c in CASES) for n in WORLD_SIZES] == [42, 43, 44]
