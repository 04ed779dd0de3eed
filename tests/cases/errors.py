"""Bad-input cases run inside a live world: each must raise locally, with the constraint and the value received,
before anything is sent (so the world stays usable afterwards)."""

from __future__ import annotations

import re

from hyper_parallel import get_platform


def _raises(exc: type, pattern: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert re.search(pattern, str(e)), f"message {str(e)!r} does not match {pattern!r}"
    else:
        raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")


def bad_splits():
    p = _platform()
    world = p.get_world_size()
    x = p.zeros((world, 2))
    a2a = p.all_to_all_single
    _raises(ValueError, r"non-negative, got \[-1", a2a, x, None, [-1, 1 + world - 1] + [0] * (world - 2),
            [1] * world)
    _raises(ValueError, r"one entry per group rank \(%d\), got 1 entries" % world, a2a, x, None, [world],
            [1] * world)
    _raises(ValueError, r"sum to %d but x.shape\[0\] is %d" % (world + 1, world), a2a, x, None,
            [2] + [1] * (world - 1), [1] * world)
    _raises(ValueError, r"sum to %d but output_shape\[0\] is %d" % (world, world + 1), a2a, x, (world + 1, 2),
            [1] * world, [1] * world)
    _raises(ValueError, r"must equal the input shape except in dim 0", a2a, x, (world, 3), [1] * world,
            [1] * world)
    _raises(TypeError, r"Python ints", a2a, x, None, [1.5] + [1] * (world - 1), [1] * world)
    _raises(ValueError, r"divisible by the group size", a2a, p.zeros((world + 1, 2)))
    return True


def bad_arguments():
    p = _platform()
    world = p.get_world_size()
    _raises(ValueError, r"reduce op must be one of \['sum', 'max', 'avg'\], got 'prod'", p.all_reduce,
            p.zeros((2,)), "prod")
    _raises(TypeError, r"op 'avg' needs a floating dtype, got int64", p.all_reduce, p.zeros((2,), dtype="int64"),
            "avg")
    _raises(ValueError, r"dim 0 \(%d\) must be divisible by the group size" % (world + 1), p.reduce_scatter_tensor,
            p.zeros((world + 1, 2)))
    _raises(TypeError, r"cannot carry dtype 'bool'; supported dtypes: \[", p.all_reduce, p.zeros((2,), dtype="bool"))
    _raises(TypeError, r"expected a \w+, got list", p.all_reduce, [1.0, 2.0])
    _raises(ValueError, r"distinct world ranks in \[0, %d\), got \[0, 0\]" % world, p.new_group, [0, 0])
    _raises(ValueError, r"got \[%d\]" % world, p.new_group, [world])
    _raises(ValueError, r"src rank %d is not a member" % world, p.broadcast, p.zeros((1,)), world)
    _raises(TypeError, r"group must be a hyper_parallel Group or None, got str", p.all_reduce, p.zeros((1,)),
            "sum", "world")
    return True


def not_a_member():
    """Every rank creates {0, 1}; ranks 2 and 3 then try to use it."""
    p = _platform()
    pair = p.new_group([0, 1])
    if p.get_rank() >= 2:
        _raises(ValueError, r"rank %d is not a member of the group with ranks \[0, 1\]" % p.get_rank(),
                p.all_reduce, p.zeros((1,)), "sum", pair)
        _raises(ValueError, r"not a member", p.group_rank, pair)
    else:
        assert p.tolist(p.all_reduce(p.tensor([1.0]), group=pair)) == [2.0]
    return True


def _platform():
    return get_platform()
