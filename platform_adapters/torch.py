"""PyTorch adapter: gloo on CPU, NCCL on CUDA.

The base class has already validated every argument (splits, membership, dtypes) when a ``_`` method here runs.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from hyper_parallel.platform import DTYPE_NAMES, Group, Platform, WorldEnv

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class _ClosureFunction(torch.autograd.Function):
    """A torch.autograd.Function whose forward and backward are closures passed at call time."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward_fn = backward
        with torch.no_grad():
            out = forward(x)
        # An op that returns its input unchanged must still hand autograd a distinct tensor.
        return out.view_as(out) if out is x else out

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad.contiguous()), None, None


class TorchPlatform(Platform):
    """PyTorch through ``torch.distributed``: gloo on CPU, NCCL when CUDA is available."""

    def __init__(self) -> None:
        super().__init__()
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ identity
    name = "torch"

    @property
    def device_type(self) -> str:
        return self._device.type

    @property
    def device(self) -> torch.device:
        """The device tensors of this process are created on."""
        return self._device

    @property
    def dist_backend(self) -> str:
        return "nccl" if self._device.type == "cuda" else "gloo"

    Tensor = torch.Tensor
    Parameter = torch.nn.Parameter
    Module = torch.nn.Module

    def versions(self) -> dict[str, str]:
        out = {"torch": torch.__version__}
        if torch.cuda.is_available():
            out["cuda"] = str(torch.version.cuda)
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        return out

    # ------------------------------------------------------------------ process groups
    def _select_device(self, env: WorldEnv) -> None:
        if torch.cuda.is_available():
            self._device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self._device)

    def _init_process_group(self, env: WorldEnv, timeout_s: float) -> Any:
        self._select_device(env)
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            dist.init_process_group(
                backend=self.dist_backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        return dist.group.WORLD

    def _new_group(self, ranks: tuple[int, ...], member: bool) -> Any:
        # torch wants every rank to take part in creating every group.
        return dist.new_group(list(ranks))

    def _destroy_process_group(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _barrier(self, group: Group) -> None:
        if self.dist_backend == "nccl":
            dist.barrier(group=group.native, device_ids=[self._device.index])
        else:
            self._issue(dist.barrier, group=group.native)

    def _issue(self, collective: Callable, *args, **kwargs) -> None:
        """Run one blocking collective. The NPU adapter overrides this to wait on the handle explicitly."""
        collective(*args, **kwargs)

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, x, op: str, group: Group):
        out = x.detach().clone()
        if op == "avg":
            # gloo has no AVG; sum then divide gives the same result on every backend.
            self._issue(dist.all_reduce, out, op=dist.ReduceOp.SUM, group=group.native)
            return out.div_(group.size)
        self._issue(dist.all_reduce, out, op=_REDUCE_OPS[op], group=group.native)
        return out

    def _all_gather_into_tensor(self, x, group: Group):
        x = x.detach().contiguous()
        out = x.new_empty((x.shape[0] * group.size, *x.shape[1:]))
        self._issue(dist.all_gather_into_tensor, out, x, group=group.native)
        return out

    def _reduce_scatter_tensor(self, x, op: str, group: Group):
        x = x.detach().contiguous()
        out = x.new_empty((x.shape[0] // group.size, *x.shape[1:]))
        if self.dist_backend == "gloo":
            # gloo has no reduce_scatter: all_reduce, then keep this rank's slice.
            full = self._all_reduce(x, "sum" if op == "avg" else op, group)
            out.copy_(full.chunk(group.size)[group.ranks.index(self._rank)])
            return out.div_(group.size) if op == "avg" else out
        if op == "avg":
            self._issue(dist.reduce_scatter_tensor, out, x, op=dist.ReduceOp.SUM, group=group.native)
            return out.div_(group.size)
        self._issue(dist.reduce_scatter_tensor, out, x, op=_REDUCE_OPS[op], group=group.native)
        return out

    def _all_to_all_single(self, x, output_shape, input_splits, output_splits, group: Group, async_op: bool):
        x = x.detach().contiguous()
        out = x.new_empty(output_shape)
        kwargs = dict(output_split_sizes=output_splits, input_split_sizes=input_splits, group=group.native)
        if async_op:
            return out, dist.all_to_all_single(out, x, async_op=True, **kwargs).wait
        self._issue(dist.all_to_all_single, out, x, **kwargs)
        return out, None

    def _broadcast(self, x, src: int, group: Group):
        out = x.detach().clone().contiguous()
        self._issue(dist.broadcast, out, src=src, group=group.native)
        return out

    # ------------------------------------------------------------------ autograd
    def autograd_function(self, forward: Callable, backward: Callable) -> Callable:
        return lambda x: _ClosureFunction.apply(x, forward, backward)

    def value_and_grad(self, fn: Callable, inputs: Sequence, params: Sequence = ()) -> tuple:
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        for p in params:
            p.grad = None
        value = fn(*leaves)
        targets = leaves + list(params)
        grads = torch.autograd.grad(value, targets, allow_unused=True) if targets else ()
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        return value.detach(), tuple(grads[: len(leaves)]), tuple(grads[len(leaves):])

    # ------------------------------------------------------------------ factories
    _DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

    def dtype(self, name: str):
        if isinstance(name, torch.dtype):
            return name
        if name not in self._DTYPES:
            raise ValueError(f"unknown dtype name {name!r}; valid names: {list(DTYPE_NAMES)}")
        return self._DTYPES[name]

    def dtype_name(self, dtype) -> str:
        return str(dtype).removeprefix("torch.")

    def arange(self, end: int, *, dtype: str = "int64", device=None):
        return torch.arange(end, dtype=self.dtype(dtype), device=device or self._device)

    def zeros(self, shape: Sequence[int], *, dtype: str = "float32", device=None):
        return torch.zeros(tuple(shape), dtype=self.dtype(dtype), device=device or self._device)

    def empty(self, shape: Sequence[int], *, dtype: str = "float32", device=None):
        return torch.empty(tuple(shape), dtype=self.dtype(dtype), device=device or self._device)

    def cat(self, tensors: Sequence, dim: int = 0):
        return torch.cat(list(tensors), dim=dim)

    def tensor(self, data: Sequence, *, dtype: str = "float32", device=None):
        return torch.tensor(data, dtype=self.dtype(dtype), device=device or self._device)

    def _tolist(self, x) -> list:
        return x.detach().cpu().tolist()

    # ------------------------------------------------------------------ modules
    def named_modules(self, module) -> list:
        return list(module.named_modules())

    def named_parameters(self, module) -> list:
        return list(module.named_parameters())

    def replace_parameter(self, module, name: str, tensor):
        old = getattr(module, name)
        param = torch.nn.Parameter(tensor.detach().clone(), requires_grad=old.requires_grad)
        setattr(module, name, param)
        return param

    def register_forward_pre_hook(self, module, hook: Callable):
        return module.register_forward_pre_hook(hook)

    def register_forward_hook(self, module, hook: Callable):
        return module.register_forward_hook(hook)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
