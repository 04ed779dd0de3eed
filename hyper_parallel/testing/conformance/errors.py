"""Conformance cases for bad input, run inside a live world: each call must raise locally, with the constraint and
the value received, before anything is sent (so the world stays usable afterwards; the suite checks that with a
collective right after).

:func:`raises` is shared with the project's other case modules.
"""

from __future__ import annotations

import re

from hyper_parallel import get_platform


def raises(exc: type, pattern: str, fn, *args, **kwargs) -> None:
    """Call ``fn(*args, **kwargs)`` and assert it raises ``exc`` with a message matching ``pattern`` (``re.search``).

    Raises:
        AssertionError: ``fn`` returned, or its message does not match. Any other exception propagates as is.
    """
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert re.search(pattern, str(e)), f"message {str(e)!r} does not match {pattern!r}"
    else:
        raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise {exc.__name__}")


def bad_splits():
    """``all_to_all_single`` split sizes: negative, wrong length, wrong sum, bad output shape, non-int, uneven x."""
    p = _platform()
    world = p.get_world_size()
    x = p.zeros((world, 2))
    a2a = p.all_to_all_single
    ones = [1] * world
    raises(ValueError, r"non-negative, got \[-1", a2a, x, input_split_sizes=[-1, world] + [0] * (world - 2),
           output_split_sizes=ones)
    raises(ValueError, r"one entry per group rank \(%d\), got 1 entries" % world, a2a, x, input_split_sizes=[world],
           output_split_sizes=ones)
    raises(ValueError, r"sum to %d but x.shape\[0\] is %d" % (world + 1, world), a2a, x,
           input_split_sizes=[2] + [1] * (world - 1), output_split_sizes=ones)
    raises(ValueError, r"sum to %d but output_shape\[0\] is %d" % (world, world + 1), a2a, x,
           output_shape=(world + 1, 2), input_split_sizes=ones, output_split_sizes=ones)
    raises(ValueError, r"must equal the input shape except in dim 0", a2a, x, output_shape=(world, 3),
           input_split_sizes=ones, output_split_sizes=ones)
    raises(TypeError, r"Python ints", a2a, x, input_split_sizes=[1.5] + [1] * (world - 1), output_split_sizes=ones)
    raises(ValueError, r"divisible by the group size", a2a, p.zeros((world + 1, 2)))
    return True


def bad_arguments():
    """Reduce op, dtype, divisibility, tensor type, group ranks, broadcast src and group type."""
    p = _platform()
    world = p.get_world_size()
    raises(ValueError, r"reduce op must be one of \['sum', 'max', 'avg'\], got 'prod'", p.all_reduce,
           p.zeros((2,)), "prod")
    raises(TypeError, r"op 'avg' needs a floating dtype, got int64", p.all_reduce, p.zeros((2,), dtype="int64"),
           "avg")
    raises(ValueError, r"dim 0 \(%d\) must be divisible by the group size" % (world + 1), p.reduce_scatter_tensor,
           p.zeros((world + 1, 2)))
    raises(TypeError, r"cannot carry dtype 'bool'; supported dtypes: \[", p.all_reduce, p.zeros((2,), dtype="bool"))
    raises(TypeError, r"expected a \w+, got list", p.all_reduce, [1.0, 2.0])
    raises(ValueError, r"distinct world ranks in \[0, %d\), got \[0, 0\]" % world, p.new_group, [0, 0])
    raises(ValueError, r"got \[%d\]" % world, p.new_group, [world])
    raises(ValueError, r"src rank %d is not a member" % world, p.broadcast, p.zeros((1,)), world)
    raises(TypeError, r"group must be a hyper_parallel Group or None, got str", p.all_reduce, p.zeros((1,)),
           "sum", "world")
    return True


def not_a_member():
    """Every rank creates the group {0, 1}; ranks 2 and up must be refused when they use it (needs 3+ ranks)."""
    p = _platform()
    pair = p.new_group([0, 1])
    if p.get_rank() >= 2:
        raises(ValueError, r"rank %d is not a member of the group with ranks \[0, 1\]" % p.get_rank(),
               p.all_reduce, p.zeros((1,)), "sum", pair)
        raises(ValueError, r"not a member", p.group_rank, pair)
    else:
        assert p.tolist(p.all_reduce(p.tensor([1.0]), group=pair)) == [2.0]
    return True


def _platform():
    return get_platform()
