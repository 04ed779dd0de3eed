"""Conformance cases for the contract members that act on one rank: factories, dtypes, autograd with parameters,
forward hooks, seeding and call counting.

They run in a world like every case (call counting is checked on real collectives). Framework-neutral: the
layer under test is a subclass of ``Platform.Module`` defining both ``forward`` (torch's spelling) and ``construct``
(MindSpore's); the seeding check draws with the ``randn`` of the framework that defines ``Platform.Tensor``.
"""

from __future__ import annotations

import importlib

from hyper_parallel import get_platform
from hyper_parallel.testing.conformance.collectives import _close


def factories():
    """``arange``, ``zeros``, ``empty``, ``cat``, ``tensor`` (zero-size shapes too) and every dtype name."""
    p = get_platform()
    assert p.tolist(p.arange(5)) == [0, 1, 2, 3, 4] and p.dtype_name(p.arange(3).dtype) == "int64"
    assert p.tolist(p.arange(0)) == []
    assert p.tolist(p.zeros((2, 2), dtype="int32")) == [[0, 0], [0, 0]]
    assert tuple(p.zeros((0, 4)).shape) == (0, 4) and tuple(p.empty((3, 0)).shape) == (3, 0)
    assert tuple(p.empty((2, 5), dtype="bfloat16").shape) == (2, 5)
    a, b = p.tensor([[1.0, 2.0]]), p.zeros((0, 2))
    assert p.tolist(p.cat([a, b, a])) == [[1.0, 2.0], [1.0, 2.0]]
    assert p.tolist(p.cat([p.tensor([[1.0], [2.0]]), p.tensor([[3.0], [4.0]])], dim=1)) == [[1.0, 3.0], [2.0, 4.0]]
    for name in ("bool", "int32", "int64", "float16", "bfloat16", "float32", "float64"):
        assert p.dtype_name(p.dtype(name)) == name
        assert p.dtype_name(p.zeros((1,), dtype=name).dtype) == name
    assert p.tolist(p.tensor([3, 4], dtype="int64")) == [3, 4]
    try:
        p.dtype("float8")
    except ValueError as e:
        assert "float8" in str(e) and "float32" in str(e)
    else:
        raise AssertionError("unknown dtype name accepted")
    return True


def count_calls():
    """``count_calls``: nested blocks, call counts by name and payload bytes; ``profile_range`` around calls."""
    p = get_platform()
    x = p.zeros((p.get_world_size(), 2))
    with p.count_calls() as outer:
        p.all_reduce(x)
        with p.count_calls() as inner:
            p.all_to_all_single(x)
            p.tolist(x)
    assert dict(inner) == {"all_to_all_single": 1, "host_sync": 1}, dict(inner)
    assert dict(outer) == {"all_reduce": 1, "all_to_all_single": 1, "host_sync": 1}, dict(outer)
    # payload bytes: all_reduce hands over all of x (world rows of 2 float32); all_to_all sends one row to each peer
    world = p.get_world_size()
    assert outer.bytes["all_reduce"] == 8 * world and outer.bytes["host_sync"] == 0, dict(outer.bytes)
    assert inner.bytes["all_to_all_single"] == outer.bytes["all_to_all_single"] == 8 * (world - 1), dict(inner.bytes)
    # uneven: rank r sends r + j + 1 rows of 3 bfloat16 to rank j; only the rows for peers count
    rank = p.get_rank()
    send = [rank + j + 1 for j in range(world)]
    recv = [i + rank + 1 for i in range(world)]
    with p.count_calls() as calls, p.profile_range("hyper_parallel.test_range"):
        p.all_to_all_single(p.zeros((sum(send), 3), dtype="bfloat16"), output_split_sizes=recv, input_split_sizes=send)
        p.broadcast(p.zeros((5,), dtype="int32"), src=0)
    assert calls.bytes["all_to_all_single"] == 6 * (sum(send) - send[rank]), dict(calls.bytes)
    assert calls.bytes["broadcast"] == 20 and calls["broadcast"] == 1, dict(calls.bytes)
    return True


def value_and_grad_with_params():
    """``value_and_grad`` of ``sum(x * w * x)`` with respect to an input and a ``Parameter``."""
    p = get_platform()
    w = p.Parameter(p.tensor([1.0, 2.0, 3.0]))  # trainable by default in torch and MindSpore
    x = p.tensor([4.0, 5.0, 6.0])
    value, (gx,), (gw,) = p.value_and_grad(lambda t: (t * w * t).sum(), [x], [w])
    assert abs(float(p.tolist(value)) - (16 + 50 + 108)) < 1e-4
    _close(p.tolist(gx), [8.0, 20.0, 36.0], "float32", "d/dx")
    _close(p.tolist(gw), [16.0, 25.0, 36.0], "float32", "d/dw")
    return True


def hooks():
    """A forward pre-hook replaces the arguments, a forward hook the output; ``remove()`` detaches both."""
    p = get_platform()
    module = _scale_module(p, 3.0)
    seen = []
    pre = p.register_forward_pre_hook(module, lambda m, args: (args[0] + 1,))
    post = p.register_forward_hook(module, lambda m, args, out: seen.append(p.tolist(out)) or out * 10)
    out = module(p.tensor([1.0, 2.0]))
    assert p.tolist(out) == [60.0, 90.0] and seen == [[6.0, 9.0]], (p.tolist(out), seen)
    pre.remove()
    post.remove()
    assert p.tolist(module(p.tensor([1.0, 2.0]))) == [3.0, 6.0]
    return True


def _scale_module(p, factor: float):
    """A ``p.Module`` computing ``x * factor``, whichever of ``forward`` / ``construct`` the framework calls."""

    def call(self, x):
        return x * factor

    return type("Scale", (p.Module,), {"forward": call, "construct": call})()


def manual_seed():
    """The same seed gives the same draw from the framework's global generator."""
    p = get_platform()
    draws = []
    for _ in range(2):
        p.manual_seed(1234)
        draws.append(p.tolist(_randn(p)(4)))
    assert draws[0] == draws[1], draws
    return True


def _randn(p):
    """The ``randn`` of the framework that defines ``p.Tensor`` (``torch.randn``, ``mindspore.ops.randn``)."""
    framework = importlib.import_module(p.Tensor.__module__.split(".")[0])
    for owner in (framework, getattr(framework, "ops", None), getattr(framework, "random", None)):
        if callable(getattr(owner, "randn", None)):
            return owner.randn
    raise AssertionError(
        f"manual_seed: the case draws with `randn` of the framework defining Tensor ({framework.__name__!r}), "
        f"looked up as {framework.__name__}.randn, .ops.randn and .random.randn; none exists"
    )
