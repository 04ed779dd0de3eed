"""The counts exchange of a dispatch, which also makes every rank agree or fail together.

Shape legend as in :mod:`~hyper_parallel.expert_parallel.dispatch`: ``R`` ranks of the EP group, ``G`` global
experts, ``E = G / R`` local experts, ``H`` header fields.

Every rank contributes one row ``[counts_G..., header_H...]`` to ONE ``all_gather_into_tensor``, then reads the
gathered ``[R, G + H]`` on the host (the dispatch's one device-to-host sync). The header carries what the ranks must
agree on, and what each found wrong locally before sending:

    rows        the routed input's rows (the counts must sum to it)
    hidden      the routed input's row size (the token all-to-all needs the same on every rank)
    dtype       the routed input's dtype code (an all-to-all between different dtypes returns garbage)
    error       0, or the code of a problem this rank found before the exchange
    detail      the value behind that problem (e.g. the counts' wrong length)

Every rank then runs the same checks on the same gathered numbers, so a problem on ONE rank raises the same
``ValueError`` on EVERY rank of the group, naming the rank and the values, before any token is sent: no rank is left
waiting in a collective its peers never join. A rank whose own counts are malformed (wrong length, not integers)
still sends a row of the agreed size (zeros plus its error code), so the exchange itself cannot break.

Gathering every rank's full counts costs ``R * (G + H)`` integers, a few kB for hundreds of experts, in the same
single collective that an all-to-all of the counts needed before.
"""

from __future__ import annotations

import dataclasses
import itertools

from hyper_parallel._select import get_platform
from hyper_parallel.platform import DTYPE_NAMES, Group

__all__ = ["ExchangedCounts", "exchange_counts"]

_HEADER = ("rows", "hidden", "dtype", "error", "detail")
_OK, _BAD_LENGTH, _NOT_INTEGER, _NOT_2D = 0, 1, 2, 3
_INTEGER_DTYPES = ("int32", "int64")


@dataclasses.dataclass(frozen=True)
class ExchangedCounts:
    """What the exchange leaves on every rank."""

    counts_RE: object
    """int64 ``[R*E]`` on the device: rows from rank r for each of this rank's local experts (rank-major)."""
    host_counts_G: tuple[int, ...]
    """This rank's rows per global expert, on the host."""
    host_counts_RE: tuple[int, ...]
    """``counts_RE`` on the host."""


def _local_problem(routed_input_ND, counts_G, num_experts: int) -> tuple[int, int]:
    p = get_platform()
    if len(routed_input_ND.shape) != 2:
        return _NOT_2D, len(routed_input_ND.shape)
    if len(counts_G.shape) != 1 or int(counts_G.shape[0]) != num_experts:
        return _BAD_LENGTH, int(counts_G.shape[0]) if len(counts_G.shape) == 1 else -len(counts_G.shape)
    if p.dtype_name(counts_G.dtype) not in _INTEGER_DTYPES:
        return _NOT_INTEGER, DTYPE_NAMES.index(p.dtype_name(counts_G.dtype))
    return _OK, 0


def exchange_counts(routed_input_ND, num_tokens_per_expert_G, group: Group, num_experts: int) -> ExchangedCounts:
    """Gather every rank's counts and header in one collective and one host sync, and check them on every rank.

    Args:
        routed_input_ND: this rank's rows, grouped by global expert.
        num_tokens_per_expert_G: this rank's rows per global expert (an integer tensor of ``num_experts``).
        group: the EP group.
        num_experts: G, which every rank must agree on (the experts module's global expert count).

    Raises:
        ValueError: on EVERY rank of the group, when any rank's input is inconsistent (counts of the wrong length
            or dtype, negative, or not summing to the rows; a different row size or dtype than rank 0's).
    """
    p = get_platform()
    R, G = group.size, num_experts
    E = G // R
    error, detail = _local_problem(routed_input_ND, num_tokens_per_expert_G, G)
    device = getattr(routed_input_ND, "device", None)
    counts_G = num_tokens_per_expert_G.to(p.dtype("int64")) if error == _OK else \
        p.zeros((G,), dtype="int64", device=device)  # a row of the agreed size, whatever this rank got
    rows = int(routed_input_ND.shape[0]) if len(routed_input_ND.shape) else 0
    hidden = int(routed_input_ND.shape[1]) if len(routed_input_ND.shape) == 2 else -1
    header = (rows, hidden, DTYPE_NAMES.index(p.dtype_name(routed_input_ND.dtype)), error, detail)
    row = p.cat([counts_G.reshape(-1), _header_tensor(p, header, device)])
    gathered = p.all_gather_into_tensor(row, group=group)
    host = p.tolist(gathered)  # the one device-to-host sync of a dispatch
    width = G + len(_HEADER)
    table = [host[j * width:(j + 1) * width] for j in range(R)]
    _raise_on_disagreement(table, G, group)
    me = group.ranks.index(p.get_rank())
    counts_RE = gathered.reshape(R, width)[:, me * E:(me + 1) * E].reshape(-1)
    return ExchangedCounts(counts_RE=counts_RE, host_counts_G=tuple(table[me][:G]),
                           host_counts_RE=tuple(itertools.chain.from_iterable(row[me * E:(me + 1) * E]
                                                                              for row in table)))


_HEADERS: dict = {}
"""Header tensors already on a device, by (platform, device, values): a training run's header repeats from step to
step (the same rows, width and dtype), and a fresh one is a host-to-device copy on every dispatch (~30 us of host
time on a GPU). Never written to: the exchange concatenates a copy."""


def _header_tensor(p, header: tuple, device):
    key = (p.name, str(device), header)
    if key not in _HEADERS:
        if len(_HEADERS) >= 64:  # many shapes (a sweep, varying batch sizes): start again rather than grow
            _HEADERS.clear()
        _HEADERS[key] = p.tensor(list(header), dtype="int64", device=device)
    return _HEADERS[key]


def _raise_on_disagreement(table: list[list[int]], G: int, group: Group) -> None:
    """The same checks on the same numbers on every rank: all raise, or none."""
    problems = []
    first = dict(zip(_HEADER, table[0][G:]))
    for j, row in enumerate(table):
        rank = group.ranks[j]
        counts, head = row[:G], dict(zip(_HEADER, row[G:]))
        if head["error"] == _NOT_2D:
            problems.append(f"rank {rank}: routed_input must be 2-D [rows, hidden], got {head['detail']}-D")
            continue
        if head["error"] == _BAD_LENGTH:
            got = f"{head['detail']} entries" if head["detail"] >= 0 else f"{-head['detail']}-D"
            problems.append(f"rank {rank}: num_tokens_per_expert must have one entry per expert ({G}), got {got}")
        elif head["error"] == _NOT_INTEGER:
            problems.append(f"rank {rank}: num_tokens_per_expert must be an integer tensor ({list(_INTEGER_DTYPES)}), "
                            f"got {DTYPE_NAMES[head['detail']]}")
        elif min(counts) < 0:
            problems.append(f"rank {rank}: num_tokens_per_expert has negative entries: {counts}")
        elif sum(counts) != head["rows"]:
            problems.append(f"rank {rank}: num_tokens_per_expert sums to {sum(counts)} but routed_input has "
                            f"{head['rows']} rows")
        if head["hidden"] != first["hidden"]:
            problems.append(f"rank {rank}: routed_input rows have {head['hidden']} values, rank {group.ranks[0]}'s "
                            f"have {first['hidden']}")
        if head["dtype"] != first["dtype"]:
            problems.append(f"rank {rank}: routed_input is {DTYPE_NAMES[head['dtype']]}, rank {group.ranks[0]}'s is "
                            f"{DTYPE_NAMES[first['dtype']]}")
    if problems:
        raise ValueError(f"expert-parallel dispatch over ranks {list(group.ranks)}: " + "; ".join(problems)
                         + " (raised on every rank of the group, before any token was sent)")
