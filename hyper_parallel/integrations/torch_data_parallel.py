"""The torch side of :class:`~hyper_parallel.parallel.data_parallel.DataParallel`: gradients reduced during
backward, bucket by bucket, overlapped with the rest of backward (as DDP does).

Every trainable parameter gets a post-accumulate-grad hook. The first hook of a backward queues a callback for the
end of backward. When every gradient of a bucket has been accumulated, and every earlier bucket has been launched
(buckets launch in one fixed order on every rank, so the ranks' all-reduces always match), the bucket's gradients
are copied into one flat buffer and its all-reduce starts asynchronously. At the end of backward the callback
launches the buckets still waiting (a parameter that got no gradient this step counts as zeros, as DDP's
``find_unused_parameters``), waits for every all-reduce, and writes the scaled results back into ``param.grad``.

The torch adapter installs it (:meth:`~platform_adapters.torch.TorchPlatform.register_gradient_reducer`); nothing
else imports this module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4: the module was private
    from torch.distributed._tensor import DTensor

from hyper_parallel._select import get_platform
from hyper_parallel.parallel.data_parallel import GradientReducer

__all__ = ["install"]

_STATE_ATTR = "_hyper_parallel_ddp_state"
_REDUCED_ATTR = "_hyper_parallel_reduced"  # on a param.grad this module wrote: already reduced


class _Backward:
    """One backward's progress: which gradients are ready, which buckets are launched, their handles."""

    def __init__(self, reducer: GradientReducer):
        self.reducer = reducer
        self.ready = [False] * len(reducer.params)
        self.launched = 0
        self.pending: list[tuple[int, torch.Tensor, object]] = []


class _State:
    def __init__(self, reducer: GradientReducer):
        self.reducer = reducer
        self.bucket_of = {}
        for b, bucket in enumerate(reducer.buckets):
            for i in bucket.indices:
                self.bucket_of[i] = b
        self.backward: _Backward | None = None


def install(module: torch.nn.Module, reducer: GradientReducer) -> None:
    """Register the hooks on ``reducer.params`` (once per module).

    Raises:
        ValueError: some parameters are torch DTensors (FSDP2's ``fully_shard`` or torch's own tensor parallelism):
            their gradients are reduced by that library, and cannot join a flat all-reduce.
    """
    foreign = [name for name, param in zip(reducer.names, reducer.params) if isinstance(param, DTensor)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ValueError(f"DataParallel: {len(foreign)} parameters are torch DTensors ({shown}): a library such as "
                         "FSDP2's fully_shard already reduces their gradients. Pass the modules it wraps as "
                         "DataParallel(data_axes=..., ignored=[...]) (see the Training page)")
    state = _State(reducer)
    object.__setattr__(module, _STATE_ATTR, state)
    for index, param in enumerate(reducer.params):
        param.register_post_accumulate_grad_hook(lambda _param, index=index: _grad_ready(state, index))


def _grad_ready(state: _State, index: int) -> None:
    grad = state.reducer.params[index].grad
    if getattr(grad, _REDUCED_ATTR, False):
        # this backward added into a gradient an earlier backward already reduced: reducing the sum again would
        # scale the earlier part twice, a silently wrong gradient
        raise RuntimeError(f"DataParallel: the gradient of {state.reducer.names[index]} was reduced by an earlier "
                           "backward and not cleared; call optimizer.zero_grad() (set_to_none=True, torch's default) "
                           "between steps: gradient accumulation over several backwards is not supported")
    if state.backward is None:
        state.backward = _Backward(state.reducer)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _finish(state))
    run = state.backward
    run.ready[index] = True
    _launch_ready(run)


def _launch_ready(run: _Backward, everything: bool = False) -> None:
    buckets = run.reducer.buckets
    while run.launched < len(buckets):
        bucket = buckets[run.launched]
        if not everything and not all(run.ready[i] for i in bucket.indices):
            return
        run.pending.append(_launch(run.reducer, run.launched))
        run.launched += 1


def _launch(reducer: GradientReducer, b: int):
    bucket = reducer.buckets[b]
    grads = [_grad(reducer.params[i]) for i in bucket.indices]
    if bucket.group is None:
        return b, None, None
    flat = torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else grads[0].reshape(-1).clone()
    p = get_platform()
    native = p._group(bucket.group, "DataParallel's gradient all-reduce").native  # refuses a left world's group
    p._record("all_reduce", flat.numel() * flat.element_size())
    handle = dist.all_reduce(flat, group=native, async_op=True)
    return b, flat, handle


def _grad(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:  # no gradient this step: zeros, so every rank's buckets still match
        param.grad = torch.zeros_like(param)
    return param.grad


def _finish(state: _State) -> None:
    run, state.backward = state.backward, None
    _launch_ready(run, everything=True)
    reducer = run.reducer
    for b, flat, handle in run.pending:
        bucket = reducer.buckets[b]
        if flat is None:
            for i in bucket.indices:
                reducer.params[i].grad.mul_(bucket.scale)
                setattr(reducer.params[i].grad, _REDUCED_ATTR, True)
            continue
        handle.wait()
        flat.mul_(bucket.scale)
        start = 0
        for i in bucket.indices:
            grad = reducer.params[i].grad
            n = grad.numel()
            grad.copy_(flat[start:start + n].view_as(grad))
            setattr(grad, _REDUCED_ATTR, True)
            start += n
