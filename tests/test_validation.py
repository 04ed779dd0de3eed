"""Host-side argument checks (framework-free): they decide what is refused before any byte is sent."""

import pytest

from hyper_parallel import _validation as check
from hyper_parallel.platform import Group, Handle


def test_splits_none_means_even():
    assert check.check_splits(None, 8, 4, "input_split_sizes", "x.shape[0]") == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"x.shape\[0\] \(7\) must be divisible by the group size \(2\)"):
        check.check_splits(None, 7, 2, "input_split_sizes", "x.shape[0]")


@pytest.mark.parametrize("splits,match", [
    ([1, -1, 2], r"non-negative, got \[1, -1, 2\]"),
    ([1, 1], r"one entry per group rank \(3\), got 2 entries"),
    ([1, 1, 1], r"sum to 3 but x.shape\[0\] is 2"),
    ([1, True, 0], r"Python ints"),
])
def test_bad_splits(splits, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check.check_splits(splits, 2, 3, "input_split_sizes", "x.shape[0]")


def test_zero_splits_are_valid():
    assert check.check_splits([0, 0, 0], 0, 3, "output_split_sizes", "output_shape[0]") == [0, 0, 0]


def test_output_shape():
    assert check.check_output_shape([5, 3], (2, 3)) == (5, 3)
    with pytest.raises(ValueError, match=r"got output_shape=\[5, 4\] for input shape \[2, 3\]"):
        check.check_output_shape([5, 4], (2, 3))


def test_reduce_op_and_dtype():
    assert check.check_reduce_op("MAX") == "max"
    with pytest.raises(ValueError, match=r"one of \['sum', 'max', 'avg'\], got 'min'"):
        check.check_reduce_op("min")
    with pytest.raises(TypeError, match=r"backend 'mccl' cannot carry dtype 'bool'; supported dtypes: \['int64'\]"):
        check.check_dtype("bool", ("int64",), "mccl", "all_reduce")


def test_group_and_handle():
    g = Group(ranks=(2, 3))
    assert g.size == 2 and repr(g) == "Group(ranks=[2, 3])"
    with pytest.raises(ValueError, match=r"rank 0 is not a member of the group with ranks \[2, 3\]"):
        check.check_group_member(0, g.ranks, "all_reduce")
    calls = []
    h = Handle(lambda: calls.append(1))
    assert not h.is_completed()
    h.wait()
    h.wait()
    assert calls == [1] and h.is_completed() and Handle().is_completed()
