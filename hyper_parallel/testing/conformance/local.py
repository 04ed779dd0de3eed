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


def modules():
    """``named_modules`` (root first, as ``""``), ``named_parameters`` (qualified names) and
    ``replace_parameter`` (a new Parameter with the new values, ``requires_grad`` kept) on a two-level module."""
    p = get_platform()

    def init(self, child=None):
        p.Module.__init__(self)
        self.weight = p.Parameter(p.tensor([1.0, 2.0]))
        if child is not None:
            self.child = child

    def call(self, x):
        return x * self.weight

    Leaf = type("Leaf", (p.Module,), {"__init__": init, "forward": call, "construct": call})
    root = Leaf(Leaf())
    names = [n for n, _ in p.named_modules(root)]
    assert names == ["", "child"], names
    assert [n for n, _ in p.named_parameters(root)] == ["weight", "child.weight"], p.named_parameters(root)
    old = root.child.weight
    new = p.replace_parameter(root.child, "weight", p.tensor([5.0, 6.0]))
    assert isinstance(new, p.Parameter) and new is not old and root.child.weight is new
    assert p.tolist(new) == [5.0, 6.0] and new.requires_grad == old.requires_grad
    assert [p.tolist(q) for _, q in p.named_parameters(root)] == [[1.0, 2.0], [5.0, 6.0]]
    return True


def autograd_function():
    """THE autograd primitive: the forward runs ``forward``, the gradient is ``backward(dy)`` (not the
    forward's own derivative), and an identity forward still gets the custom backward."""
    p = get_platform()
    x = p.tensor([1.0, 2.0, 3.0])
    op = p.autograd_function(lambda t: t * 2, lambda g: g * 10)
    value, (g,), _ = p.value_and_grad(lambda t: (op(t) * p.tensor([1.0, 2.0, 3.0])).sum(), [x])
    assert abs(float(p.tolist(value)) - 28.0) < 1e-5, p.tolist(value)
    _close(p.tolist(g), [10.0, 20.0, 30.0], "float32", "custom backward")
    ident = p.autograd_function(lambda t: t, lambda g: g * 3)
    _, (g,), _ = p.value_and_grad(lambda t: ident(t).sum(), [x])
    _close(p.tolist(g), [3.0, 3.0, 3.0], "float32", "identity forward, custom backward")
    return True


def kernels():
    """``kernels.permute_slots`` on a worked example and ``kernels.grouped_mm`` against host products, whatever
    kernel the adapter put there."""
    import numpy as np

    p = get_platform()
    # 2 ranks x 2 local experts, rows from (rank, expert) = [1, 2 | 2, 1]: expert-major order is
    # e0: r0 row 0, r1 rows 3-4; e1: r0 rows 1-2, r1 row 5
    slots = p.kernels.permute_slots(p.tensor([1, 2, 2, 1], dtype="int64"), 2, 2, 6, p.tensor([0, 3], dtype="int64"))
    assert p.tolist(slots) == [0, 3, 4, 1, 2, 5], p.tolist(slots)
    counts = [2, 0, 3]
    x = np.arange(10.0).reshape(5, 2) / 10
    w = np.arange(18.0).reshape(3, 2, 3) / 10
    want = np.concatenate([x[:2] @ w[0], x[2:] @ w[2]])
    got = p.kernels.grouped_mm(p.tensor(x.tolist()), p.tensor(w.tolist()), counts)
    _close(p.tolist(got), want, "float32", "grouped_mm")
    return True


def host_and_state():
    """``to_numpy`` (values, shape, bfloat16 as float32), ``assign`` (in place, the same object, shape checked) and
    ``recompute_phase`` outside any recomputation (``None``)."""
    p = get_platform()
    x = p.tensor([[1.5, -2.0, 3.25]], dtype="bfloat16")
    a = p.to_numpy(x)
    assert a.shape == (1, 3) and str(a.dtype) == "float32" and a.tolist() == [[1.5, -2.0, 3.25]]
    assert p.to_numpy(p.tensor([7, 8], dtype="int64")).tolist() == [7, 8]
    param = p.Parameter(p.zeros((2,)), requires_grad=False)
    before = id(param)
    p.assign(param, p.tensor([4.0, 5.0]))
    assert id(param) == before and p.tolist(param) == [4.0, 5.0]
    try:
        p.assign(param, p.zeros((3,)))
    except ValueError as e:
        assert "[3]" in str(e) and "[2]" in str(e)
    else:
        raise AssertionError("assign accepted a value of another shape")
    assert p.recompute_phase() is None
    return True
