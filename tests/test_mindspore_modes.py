"""MindSpore reliability (issue 11): no silent wrong result, no crash without a message, no unbounded memory growth.

* Graph capture (``mindspore.jit`` in its three capture modes, GRAPH_MODE) is refused with a RuntimeError before any
  collective is issued, on 2 ranks; the same step in PyNative mode then still matches the single-device reference.
* bfloat16 through expert parallelism on CPU is refused with a TypeError naming backend, device and dtype; the
  advised float16 matches a float32 single-device reference.
* An expert-parallel training loop's resident memory stays flat: sampled at steps 10 and 60.
"""

from __future__ import annotations

import pytest

from hyper_parallel.testing.world import World
from tests.cases import mindspore_cases as mc

pytestmark = pytest.mark.backends("mindspore")

CAPTURES = ["ast", "ast_inner", "graph_mode", "bytecode", "bytecode_inner", "trace"]

#: RSS growth allowed between step 10 and step 60 of the loop below. Measured on 2 ranks (MindSpore 2.10, CPU): the
#: adapter's kernels +4.9 / +6.7 MiB; the neutral reference kernels, whose per-expert slices MindSpore compiled anew
#: every step, +36.1 / +36.8 MiB.
RSS_GROWTH_BOUND_MIB = 15.0
STEPS = 60


@pytest.mark.parametrize("target", ["a2a", "moe"])
@pytest.mark.parametrize("capture", CAPTURES)
def test_graph_capture_is_refused_before_anything_is_sent(worlds, backend, capture, target):
    heads = worlds.run(backend, 2, mc.capture_is_refused, capture, target)  # the full message is checked there
    first = "autograd_function" if target == "a2a" else "hyper_parallel.moe.router"  # the first member reached
    assert all(h.startswith(f"{first} was reached under ") for h in heads), heads


@pytest.mark.parametrize("capture", ["ast", "bytecode", "trace"])
def test_plain_collective_is_refused_under_capture(worlds, backend, capture):
    assert worlds.run(backend, 2, mc.plain_collectives_refused_under_capture, capture) == [True, True]


def test_bfloat16_is_refused_on_cpu_and_float16_matches_float32(worlds, backend):
    errors = worlds.run(backend, 2, mc.bfloat16_refused_float16_matches)
    assert max(errors) < 1e-2, errors


def test_grouped_mm_kernel_matches_the_reference(worlds, backend):
    assert worlds.run(backend, 2, mc.grouped_mm_matches_reference) == [True, True]


def _in_a_fresh_world(backend: str, fn, *args) -> list:
    """Run ``fn`` in 2 new processes: a pooled world has compiled kernels for earlier cases (MindSpore keeps one per
    shape), which hides part of the growth these tests measure (seen in CI: a rank that had run the grouped_mm
    cases grew 11 MiB under the reference kernels instead of 32)."""
    world = World(backend, 2)
    world.start()
    try:
        return world.run(fn, *args)
    finally:
        world.stop()


def test_memory_stays_flat_over_expert_parallel_training(backend):
    samples = _in_a_fresh_world(backend, mc.rss_over_training, STEPS, "adapter")
    growth = [end - start for start, end in samples]
    assert max(growth) < RSS_GROWTH_BOUND_MIB, (
        f"RSS grew by {[round(g, 1) for g in growth]} MiB per rank between step 10 and step {STEPS} "
        f"(bound {RSS_GROWTH_BOUND_MIB} MiB); samples {samples}")


def test_memory_bound_catches_per_step_compiled_slices(backend):
    """The bound above is not vacuous: the neutral reference kernels (a slice per expert) exceed it."""
    samples = _in_a_fresh_world(backend, mc.rss_over_training, STEPS, "reference")
    growth = [end - start for start, end in samples]
    assert min(growth) > RSS_GROWTH_BOUND_MIB, (
        f"the reference kernels grew only {[round(g, 1) for g in growth]} MiB per rank; samples {samples}")


@pytest.mark.parametrize("nproc", [1, 2])
def test_gradients_stay_right_after_a_step_that_raised(worlds, backend, nproc):
    assert worlds.run(backend, nproc, mc.training_after_a_raising_step_is_right, nproc > 1) == [True] * nproc


@pytest.mark.parametrize("capture", ["ast", "bytecode"])
def test_router_under_jit_routes_like_eager(worlds, backend, capture):
    assert worlds.run(backend, 2, mc.router_under_jit_matches_eager, capture) == [True, True]
