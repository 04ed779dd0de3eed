"""Permutation checks against a brute-force reference; run in-process (torch) and on every rank of a world."""

from __future__ import annotations

import numpy as np

from hyper_parallel import get_platform
from hyper_parallel.expert_parallel.permute import aligned_counts, build_permute_indices, permute, unpermute


def reference(counts: list[int], R: int, E: int, align: int) -> list[int]:
    """Source row of every expert-major slot (``T`` marks padding), by explicit loops."""
    T = sum(counts)
    starts = np.cumsum([0] + counts)[:-1]
    out = []
    for e in range(E):
        rows = [int(starts[r * E + e]) + k for r in range(R) for k in range(counts[r * E + e])]
        out += rows + [T] * (aligned_counts([len(rows)], align)[0] - len(rows))
    return out


def check(counts: list[int], R: int, E: int, align: int, D: int = 3) -> None:
    """Both index builds (the device ops and the host build from the counts), and the rows moved by the platform's
    ``Kernels.permute_rows`` without an index (forced: it is the CUDA path), against the brute-force reference."""
    kernels = get_platform().kernels
    default = kernels.host_index_build
    try:
        for on_host in (False, True):
            kernels.host_index_build = on_host
            _check(counts, R, E, align, D)
        kernels.use_fused_permute = lambda counts_RE: True  # this instance only; removed below
        _check(counts, R, E, align, D)
    finally:
        kernels.host_index_build = default
        kernels.__dict__.pop("use_fused_permute", None)


def _check(counts: list[int], R: int, E: int, align: int, D: int) -> None:
    p = get_platform()
    counts_RE = p.tensor(counts, dtype="int64")
    idx = build_permute_indices(counts_RE, counts, R, E, align=align)
    want = reference(counts, R, E, align)
    T = sum(counts)
    assert idx.fused == (T > 0 and p.kernels.use_fused_permute(counts_RE)), (counts, idx.fused)
    if not idx.fused:
        _check_indices(idx, want, counts, R, E, align)
    assert idx.num_rows == T and idx.num_slots == len(want)
    assert sum(idx.num_tokens_per_expert) == len(want)
    assert all(n % align == 0 and (align == 1 or n >= align) for n in idx.num_tokens_per_expert)
    _check_round_trip(idx, want, T, D)


def _check_indices(idx, want: list[int], counts: list[int], R: int, E: int, align: int) -> None:
    p = get_platform()
    assert p.tolist(idx.source_row_P) == want, (counts, R, E, align, p.kernels.host_index_build)
    T = sum(counts)
    inverse = [0] * T
    for slot, src in enumerate(want):
        if src < T:
            inverse[src] = slot
    assert p.tolist(idx.slot_of_row_T) == inverse, (counts, R, E, align, p.kernels.host_index_build)


def _check_round_trip(idx, want: list[int], T: int, D: int) -> None:
    p = get_platform()
    # round trip with values and gradients: permute then unpermute is the identity on real rows
    x = p.tensor((np.arange(T * D, dtype=np.float64).reshape(T, D) + 1).tolist()) if T else p.zeros((0, D))
    y = permute(x, idx)
    got = np.asarray(p.tolist(y)).reshape(len(want), D)
    for slot, src in enumerate(want):
        expect = np.zeros(D) if src == T else np.arange(src * D, src * D + D) + 1
        np.testing.assert_array_equal(got[slot], expect)
    weights = p.tensor(np.arange(len(want) * D, dtype=np.float64).reshape(-1, D).tolist()) if want else \
        p.zeros((0, D))
    _, (g,), _ = p.value_and_grad(lambda t: (unpermute(permute(t, idx) * weights, idx) * 2).sum(), [x])
    g = np.asarray(p.tolist(g)).reshape(T, D)
    for slot, src in enumerate(want):
        if src < T:
            np.testing.assert_array_equal(g[src], 2 * np.arange(slot * D, slot * D + D))


def zero_tokens_stay_connected() -> bool:
    """With no rows received, backward must still reach the op before permute (on a real rank, the dispatch
    all-to-all, which every rank must issue)."""
    p = get_platform()
    for align in (1, 8):
        reached = []
        probe = p.autograd_function(lambda t: t * 1, lambda g: reached.append(True) or g)
        idx = build_permute_indices(p.tensor([0, 0], dtype="int64"), [0, 0], 1, 2, align=align)
        weights = p.zeros((idx.num_slots, 4)) + 1
        p.value_and_grad(lambda t: (unpermute(permute(probe(t), idx) * weights, idx) * 1).sum(), [p.zeros((0, 4))])
        assert reached == [True], f"backward never reached the op before permute (align {align})"
    return True


def random_sweep(seed: int, iterations: int = 40) -> int:
    rng = np.random.RandomState(seed)
    for _ in range(iterations):
        R, E = int(rng.randint(1, 5)), int(rng.randint(1, 5))
        counts = [int(c) * int(rng.rand() > 0.3) for c in rng.randint(0, 6, R * E)]
        for align in (1, 8, 16, 32):
            check(counts, R, E, align)
    check([0, 0, 0, 0], 2, 2, 1)
    check([0, 0, 0, 0], 2, 2, 8)
    return iterations
