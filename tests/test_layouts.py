"""Expert styles on experts modules of any layout (fused, transposed, biased weights), on every backend."""

from __future__ import annotations

import pytest

from tests.cases import layout_cases as lc


@pytest.mark.parametrize("fused", ["concat", "interleave"])
@pytest.mark.parametrize("style,nproc", [("ep", 2), ("ep", 4), ("tp", 2), ("etp", 4)])
def test_fused_biased_experts_match_single_device(worlds, backend, style, nproc, fused):
    worlds.run(backend, nproc, lc.fused_experts_match_single_device, style, fused)


@pytest.mark.parametrize("style", ["ep", "etp"])
def test_ranks_receiving_no_rows(worlds, backend, style):
    worlds.run(backend, 4, lc.fused_experts_match_single_device, style, "concat", "receives_none")


def test_grouped_experts_with_an_explicit_layout(worlds, backend):
    worlds.run(backend, 2, lc.grouped_experts_take_an_explicit_layout)


def test_bad_layouts(worlds, backend):
    worlds.run(backend, 2, lc.bad_layouts)
