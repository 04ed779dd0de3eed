"""Argument checks shared by every adapter, written once.

They run on the host before any message leaves the process. Ranks that issue collectives with mismatched metadata
get silently wrong data on some libraries (MindSpore's mccl, for one), so bad input must be refused locally, and the
same way on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

REDUCE_OPS = ("sum", "max", "avg")


def check_reduce_op(op: str) -> str:
    if not isinstance(op, str) or op.lower() not in REDUCE_OPS:
        raise ValueError(f"reduce op must be one of {list(REDUCE_OPS)}, got {op!r}")
    return op.lower()


def check_group_member(rank: int, ranks: Sequence[int], what: str) -> None:
    if rank not in ranks:
        raise ValueError(
            f"{what}: rank {rank} is not a member of the group with ranks {list(ranks)}; "
            "only members may issue collectives on a group"
        )


def check_dtype(dtype_name: str, supported: Sequence[str], backend: str, what: str) -> None:
    if dtype_name not in supported:
        raise TypeError(
            f"{what}: backend {backend!r} cannot carry dtype {dtype_name!r}; supported dtypes: {sorted(supported)}"
        )


def check_splits(
    splits: Sequence[int] | None, num_rows: int, group_size: int, name: str, rows_name: str
) -> list[int]:
    """Validate one side of an all_to_all_single and return it as a list of Python ints.

    ``None`` means an even split of ``num_rows`` over the group (it must divide evenly).
    """
    if splits is None:
        if num_rows % group_size:
            raise ValueError(
                f"all_to_all_single: {name} is None, so {rows_name} ({num_rows}) must be divisible by the "
                f"group size ({group_size}); pass explicit split sizes for an uneven exchange"
            )
        return [num_rows // group_size] * group_size
    splits = list(splits)
    if len(splits) != group_size:
        raise ValueError(
            f"all_to_all_single: {name} must have one entry per group rank ({group_size}), "
            f"got {len(splits)} entries: {splits}"
        )
    for s in splits:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(
                f"all_to_all_single: {name} must hold Python ints (call tolist() on a tensor first), "
                f"got {type(s).__name__} in {splits}"
            )
        if s < 0:
            raise ValueError(f"all_to_all_single: {name} must be non-negative, got {splits}")
    if sum(splits) != num_rows:
        raise ValueError(
            f"all_to_all_single: {name} sum to {sum(splits)} but {rows_name} is {num_rows}; they must match"
        )
    return splits


def check_output_shape(output_shape: Sequence[int], input_shape: Sequence[int]) -> tuple[int, ...]:
    output_shape = tuple(int(d) for d in output_shape)
    if len(output_shape) != len(input_shape) or output_shape[1:] != tuple(input_shape[1:]):
        raise ValueError(
            "all_to_all_single: output_shape must equal the input shape except in dim 0, "
            f"got output_shape={list(output_shape)} for input shape {list(input_shape)}"
        )
    return output_shape
