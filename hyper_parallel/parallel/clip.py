"""Global-norm gradient clipping over sharded and replicated parameters: the norm of the FULL model's gradient.

A sharded parameter's local gradient is one piece of the full gradient: its ``sum |g|^p`` is summed over the ranks
holding the other pieces (the mesh axes on which it is split); a replicated parameter's is counted once. Every rank
computes the same total norm and scales its gradients by the same factor, so replicas stay identical.

* :func:`clip_grad_norm_` has torch's signature and return value and clips ``param.grad`` in place (torch);
* :func:`clip_grads` takes and returns the gradients (MindSpore's ``value_and_grad`` returns them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hyper_parallel._select import get_platform
from hyper_parallel.dtensor.module import get_parameter_spec

__all__ = ["clip_grad_norm_", "clip_grads", "total_grad_norm"]


def total_grad_norm(grads: Sequence, params: Sequence, norm_type: float = 2.0):
    """The ``norm_type``-norm of the full gradient of ``params`` (their local ``grads``), as a float32 scalar tensor,
    the same on every rank. Every rank of the parameters' meshes calls it (it all-reduces over the shard axes).

    Raises:
        ValueError: ``norm_type`` is not a positive number or ``inf``; ``grads`` and ``params`` differ in length.
    """
    p = get_platform()
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"clip_grad_norm_: norm_type must be a positive number or inf, got {norm_type!r}")
    if len(grads) != len(params):
        raise ValueError(f"clip_grad_norm_: {len(grads)} gradients for {len(params)} parameters")
    infinite = math.isinf(norm_type)
    parts: dict[tuple, object] = {}  # (mesh axes' groups the pieces are split over) -> local sum |g|^p (or max)
    # Plain gradients are reduced per (shard groups, dtype) over their concatenation: a handful of ops in all, not
    # several per gradient (MindSpore's ops cost ~0.1-1 ms each on a CPU).
    plain: dict[tuple, tuple[tuple, list]] = {}
    for g, q in zip(grads, params):
        if g is None:
            continue
        if hasattr(g, "full_tensor") and hasattr(g, "to_local"):
            # a torch DTensor gradient (a parameter torch FSDP2 shards): torch reduces its norm over its own mesh
            g = g.norm(norm_type).full_tensor()
            key = ("dtensor",)
            local = g.float() if infinite else g.float() ** norm_type
            if key in parts:
                local = _max(parts[key][1], local) if infinite else parts[key][1] + local
            parts[key] = ((), local)
            continue
        spec = get_parameter_spec(q)
        groups = () if spec is None else tuple(
            spec.device_mesh.get_group(axis) for axis, pl in enumerate(spec.placements) if pl.is_shard_like())
        plain.setdefault((tuple(grp.ranks for grp in groups), p.dtype_name(g.dtype)), (groups, []))[1].append(g)
    for (key, _), (groups, gs) in sorted(plain.items(), key=lambda kv: repr(kv[0])):  # the same order on every rank
        a = (p.cat([g.reshape(-1) for g in gs]) if len(gs) > 1 else gs[0].reshape(-1)).float().abs()
        local = (a.max() if _numel(a) else a.sum()) if infinite else (a ** norm_type).sum()
        if key in parts:
            prev = parts[key][1]
            local = _max(prev, local) if infinite else prev + local
        parts[key] = (groups, local)
    total = p.zeros((), dtype="float32")
    for key in sorted(parts, key=repr):  # the same order on every rank
        groups, local = parts[key]
        value = local.reshape(1)
        for grp in groups:
            value = p.all_reduce(value, op="max" if infinite else "sum", group=grp)
        value = value.reshape(())
        total = _max(total, value) if infinite else total + value
    return total if infinite else total ** (1.0 / norm_type)


def clip_grads(grads: Sequence, params: Sequence, max_norm: float, norm_type: float = 2.0) -> tuple[tuple, object]:
    """``(clipped grads, total norm)``: every gradient scaled by ``min(1, max_norm / (total + 1e-6))``."""
    total = total_grad_norm(grads, params, norm_type)
    return _scaled(grads, total, max_norm), total


def _scaled(grads: Sequence, total, max_norm: float) -> tuple:
    coef = get_platform().tensor([float(max_norm)], dtype="float32").reshape(()) / (total + 1e-6)
    coef = (coef < 1.0) * coef + (coef >= 1.0) * 1.0
    cast: dict = {}  # the factor in each gradient dtype, cast once per dtype

    def factor(dtype):
        if dtype not in cast:
            cast[dtype] = coef.to(dtype)
        return cast[dtype]

    return tuple(None if g is None else _times(g, factor(g.dtype)) for g in grads)


def _times(g, coef):
    if hasattr(g, "full_tensor") and hasattr(g, "to_local"):  # a torch DTensor: scale its local shard
        return g.__class__.from_local(g.to_local() * coef, g.device_mesh, g.placements,
                                      shape=g.shape, stride=g.stride())
    return g * coef


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None):
    """torch's ``clip_grad_norm_`` over the full model: clips every ``param.grad`` in place by the global norm of
    the full gradient (shards combined, replicas once) and returns that norm.

    Raises:
        TypeError: the parameters carry no ``.grad`` (a framework that returns gradients: use :func:`clip_grads`).
        RuntimeError: ``error_if_nonfinite`` and the norm is nan or inf.
    """
    params = [parameters] if hasattr(parameters, "shape") else list(parameters)
    if params and not hasattr(params[0], "grad"):
        raise TypeError(f"clip_grad_norm_ clips param.grad in place; {type(params[0]).__name__} has no .grad (use "
                        "hyper_parallel.clip_grads(grads, params, max_norm) on the gradients your framework returns)")
    params = [q for q in params if q.grad is not None]
    total = total_grad_norm([q.grad for q in params], params, norm_type)
    if error_if_nonfinite and not math.isfinite(float(get_platform().tolist(total.reshape(1))[0])):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is non-finite")
    for q, g in zip(params, _scaled([q.grad for q in params], total, max_norm)):
        q.grad.copy_(g)
    return total


def _max(a, b):
    return (a > b) * a + (a <= b) * b


def _numel(x) -> int:
    return math.prod(int(d) for d in x.shape)
