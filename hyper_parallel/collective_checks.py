"""Cross-rank checks of every collective, for debugging: ``HYPER_PARALLEL_CHECK_COLLECTIVES=1``.

A collective's arguments are checked on each rank (split sizes against the tensor, the dtype against what the
backend carries) at no cost, but what the ranks must AGREE on cannot be seen from one rank: a receiver expecting
fewer rows than its sender sends, float32 on one rank and int32 on another, an ``all_reduce`` on one rank while its
peer broadcasts. The collective libraries then return garbage with exit code 0, abort the process, or hang.

With the variable set, every collective of the platform (and the expert-parallel styles' own exchanges) first
all-gathers a small descriptor of each rank's call (which collective, dtype, shape, reduce op, source rank, split
sizes) and runs the same comparison on every rank: a disagreement raises the same ``ValueError`` on every rank,
naming the ranks and their values, before the real collective runs. It costs one extra small collective per call,
so it is for finding a bug, not for production runs. Without the variable nothing is added.

The expert-parallel dispatch needs none of this: its counts exchange always carries and checks what the ranks must
agree on (see :mod:`hyper_parallel.expert_parallel.counts_exchange`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["ENV_VAR", "enabled", "check_agreement", "check_same_tokens"]

#: Set to ``1`` to check every collective across ranks.
ENV_VAR = "HYPER_PARALLEL_CHECK_COLLECTIVES"

_KINDS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast")
_OPS = ("", "sum", "max", "avg")


def enabled() -> bool:
    """Whether the checks are on (read at each call, so a test or a debugging session can flip it)."""
    return os.environ.get(ENV_VAR, "").strip() not in ("", "0")


def check_agreement(platform, what: str, x, group, *, op: str = "", src: int = -1,
                    input_splits: Sequence[int] = (), output_splits: Sequence[int] = ()) -> None:
    """All-gather this rank's description of the call ``what`` over ``group`` and raise on every rank if the ranks
    disagree. Uses the adapter's own all-gather (not counted, not checked again).

    Raises:
        ValueError: on every rank of ``group``, naming each disagreement.
    """
    from hyper_parallel.platform import DTYPE_NAMES

    n = group.size
    shape = [int(d) for d in x.shape]
    trailing = 1
    for d in shape[1:]:
        trailing *= d
    splits = list(input_splits) + list(output_splits) if input_splits else [-1] * (2 * n)
    row = [_KINDS.index(what), DTYPE_NAMES.index(platform.dtype_name(x.dtype)), len(shape),
           shape[0] if shape else 1, trailing, _OPS.index(op), src, *splits]
    device = getattr(x, "device", None)
    gathered = platform._tolist(platform._all_gather_into_tensor(platform.tensor(row, dtype="int64", device=device),
                                                                 group))
    width = len(row)
    table = [gathered[j * width:(j + 1) * width] for j in range(n)]
    problems = _disagreements(table, group.ranks, n, DTYPE_NAMES)
    if problems:
        raise ValueError(f"{ENV_VAR}=1: the ranks of group {list(group.ranks)} disagree on a collective: "
                         + "; ".join(problems) + " (raised on every rank, before the collective ran)")


def _disagreements(table: list[list[int]], ranks: Sequence[int], n: int, dtype_names: Sequence[str]) -> list[str]:
    first, r0 = table[0], ranks[0]
    out = []
    for rank, row in zip(ranks, table):
        kind, dtype, ndim, rows, trailing, op, src = row[:7]
        if kind != first[0]:
            out.append(f"rank {rank} calls {_KINDS[kind]} where rank {r0} calls {_KINDS[first[0]]}")
            continue
        if dtype != first[1]:
            out.append(f"rank {rank} sends {dtype_names[dtype]} where rank {r0} sends {dtype_names[first[1]]}")
        if (ndim, trailing) != (first[2], first[4]) or (_KINDS[kind] != "all_to_all_single" and rows != first[3]):
            out.append(f"rank {rank}'s tensor has {ndim} dims, {rows} rows of {trailing} values; rank {r0}'s "
                       f"{first[2]} dims, {first[3]} rows of {first[4]}")
        if op != first[5]:
            out.append(f"rank {rank} reduces with {_OPS[op]!r} where rank {r0} uses {_OPS[first[5]]!r}")
        if src != first[6]:
            out.append(f"rank {rank} broadcasts from rank {src} where rank {r0} names rank {first[6]}")
    if not out and _KINDS[first[0]] == "all_to_all_single":
        for i, row in enumerate(table):
            sends = row[7:7 + n]
            for j in range(n):
                expected = table[j][7 + n + i]
                if sends[j] != expected:
                    out.append(f"rank {ranks[i]} sends {sends[j]} rows to rank {ranks[j]}, which expects {expected}")
    return out


def check_same_tokens(platform, routed_input_ND, num_tokens_per_expert_G, ep_tp_mesh) -> None:
    """ExpertTensorParallel's rule, checked: the ranks of each ``tp`` line hold the same routed tokens. Compares
    the row count, the counts' sum and two sums of the tokens (exactly: the same tokens give the same sums) of every
    rank of the mesh, so every rank raises together (a line that passed would otherwise wait for one that failed).

    Args:
        ep_tp_mesh: the 2-D mesh with axes ordered ("ep", "tp").

    Raises:
        ValueError: on every rank of the mesh, naming the tp lines whose ranks hold different tokens.
    """
    p = platform
    device = getattr(routed_input_ND, "device", None)
    rows = int(routed_input_ND.shape[0])
    if rows:  # a sum over zero rows is not reliably 0 on every backend
        x = routed_input_ND.float()
        sums = [x.sum().reshape(1), (x * x).sum().reshape(1), num_tokens_per_expert_G.float().sum().reshape(1)]
    else:
        sums = [p.zeros((3,), device=device)]
    mine = p.cat([*sums, p.tensor([float(rows)], device=device)])
    ranks = list(ep_tp_mesh.ranks)
    table = p._tolist(p._all_gather_into_tensor(mine, p.new_group(ranks)))
    stats = [table[4 * j:4 * j + 4] for j in range(len(ranks))]
    tp = ep_tp_mesh.size(1)
    bad = []
    for start in range(0, len(ranks), tp):
        line = stats[start:start + tp]
        if any(s != line[0] for s in line):
            bad.append(", ".join(f"rank {ranks[start + k]}: {int(s[3])} rows, token sum {s[0]:.6g}"
                                 for k, s in enumerate(line)))
    if bad:
        raise ValueError(f"ExpertTensorParallel needs the same routed tokens on every rank of a tp line, got different "
                         f"ones ({'; '.join(bad)}). Feed the MoE layer the tp line's shared activations (as after a "
                         f"tensor-parallel attention block), or use ExpertParallel on a mesh without tp "
                         f"({ENV_VAR}=1 check, raised on every rank)")
