"""MindSpore adapter (PyNative mode): mccl on CPU, NCCL on GPU, HCCL on Ascend.

The base class has already validated every argument (splits, membership, dtypes) when a ``_`` method here runs.

MindSpore 2.10 registers no CPU kernel for several collectives (see ``docs/MINDSPORE_CPU.md``), so on CPU this
adapter builds them from the ones that work; on GPU/Ascend it calls the native kernels instead:

* ``all_gather_into_tensor``: the list form of ``all_gather``, then a concat.
* ``reduce_scatter_tensor``: ``all_reduce``, then this member's slice (group-size times the traffic).
* ``all_to_all_single``: one ``isend`` + one ``irecv`` per peer with a non-empty split, a local copy for self. It
  completes before returning, so its handle is born completed.
* ``barrier``: the native one does not block on its first call; an ``all_reduce`` read back on the host does.
* tensor copies: ``Tensor.clone`` has no CPU kernel and ``copy_`` breaks on some views; see :func:`_copy`.

Other workarounds live where they apply: ``send``/``recv`` need the world-group cache seeded, groups are created by
their members only, and ranks come from a TCPStore (no scheduler process) unless msrun started the job.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any


def _cpu_only_host() -> bool:
    """No Ascend or NVIDIA device visible (checked without importing MindSpore)."""
    ascend = any(k.startswith("ASCEND_") for k in os.environ) or shutil.which("npu-smi")
    return not ascend and not shutil.which("nvidia-smi") and "CUDA_VISIBLE_DEVICES" not in os.environ


if _cpu_only_host():
    # On CPU, PyNative's asynchronous op launch makes every rank spin in the collectives (measured: the MoE parity
    # tests took 3x as long, a 2000-op loop 7x). Blocking launches are MindSpore's own switch; it must be set before
    # the import, and a user's own setting wins.
    os.environ.setdefault("MS_DEV_LAUNCH_BLOCKING", "1")

import mindspore  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import mint, ops  # noqa: E402
from mindspore.communication import management  # noqa: E402
from mindspore.mint import distributed as dist  # noqa: E402
from mindspore.mint.distributed import distributed as _dist_impl  # noqa: E402
from mindspore.profiler.common.record_function import RecordFunction  # noqa: E402

from hyper_parallel.platform import DTYPE_NAMES, Group, Platform, WorldEnv  # noqa: E402

_DEVICE_TYPES = {"CPU": "cpu", "GPU": "gpu", "Ascend": "ascend"}
_BACKENDS = {"cpu": "mccl", "gpu": "nccl", "ascend": "hccl"}


def _copy(x):
    """A new tensor (fresh storage, not a view) holding ``x``'s data, for the in-place collectives to write into.

    ``clone`` has no CPU kernel, ``astype`` to the same dtype aliases, ``copy_`` from a view that starts at offset 0
    without covering its storage (``x[:k]``) fails, and an in-place collective into a ``reshape`` view is lost (the
    broadcast result never lands). A one-member concat is a fresh copy of any input of one dim or more."""
    if x.ndim:
        return mint.cat([x])
    out = mint.empty((), dtype=x.dtype)
    out.copy_(mint.cat([x.reshape(1)]).reshape(()))
    return out


class _ClosureFunction(mindspore._Function):
    """A ``mindspore._Function`` (the ``torch.autograd.Function`` look-alike) whose forward and backward are closures
    passed at call time. Chosen over an ``nn.Cell`` with ``bprop``: no Cell is built per call, and the forward may
    return ``x`` itself (an identity forward still gets the custom backward)."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward_fn = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad), None, None


class MindSporePlatform(Platform):
    """MindSpore through ``mindspore.mint.distributed``: mccl on CPU, NCCL on GPU, HCCL on Ascend."""

    # mccl's AllReduce fails on float64 ("AllReduce failed"; all_gather, broadcast and send/recv carry it) and every
    # mccl collective fails on bool; the rest pass all_reduce, all_gather, broadcast and isend/irecv.
    collective_dtypes = ("int32", "int64", "float16", "bfloat16", "float32")

    def __init__(self) -> None:
        super().__init__()
        self._target = mindspore.get_context("device_target")
        if self._target not in ("GPU", "Ascend"):
            self._target = "CPU"
            mindspore.set_device("CPU")
        self._store = None
        self._groups: set[str] = set()

    # ------------------------------------------------------------------ identity
    name = "mindspore"

    @property
    def device_type(self) -> str:
        return _DEVICE_TYPES[self._target]

    @property
    def device(self) -> str:
        """The device kind tensors are created on (MindSpore places tensors itself; factories ignore ``device``)."""
        return self.device_type

    @property
    def dist_backend(self) -> str:
        return _BACKENDS[self.device_type]

    Tensor = mindspore.Tensor
    Parameter = mindspore.Parameter
    Module = mindspore.nn.Cell

    def versions(self) -> dict[str, str]:
        return {"mindspore": mindspore.__version__, "numpy": np.__version__, "device_target": self._target}

    # ------------------------------------------------------------------ process groups
    def _read_world_env(self) -> WorldEnv:
        if "RANK" in os.environ or "MS_ROLE" not in os.environ:
            return WorldEnv.from_environ()
        # msrun exports MS_WORKER_NUM / MS_SCHED_* rather than RANK / WORLD_SIZE, and without --node_rank its
        # scheduler assigns ranks only at rendezvous: join first, then read the world back from MindSpore.
        local_rank = int(os.environ.get("DEVICE_ID", os.environ.get("LOCAL_RANK", "0")))
        self._select_device(local_rank)
        management.init()
        return WorldEnv(rank=management.get_rank(), world_size=management.get_group_size(), local_rank=local_rank,
                        master_addr=os.environ.get("MS_SCHED_HOST", "127.0.0.1"),
                        master_port=int(os.environ.get("MS_SCHED_PORT", "0")))

    def _select_device(self, local_rank: int) -> None:
        # Hook for accelerators (untested here): one device per local rank, set before the first tensor exists.
        if self._target != "CPU":
            mindspore.set_device(self._target, local_rank)

    def _init_process_group(self, env: WorldEnv, timeout_s: float) -> Any:
        if not management.GlobalComm.INITED:
            self._select_device(env.local_rank)
            if "MS_ROLE" in os.environ:
                management.init()  # a scheduler process (msrun, or its env set by hand) runs the rendezvous
            else:
                # torchrun-style env: a TCPStore hosted by rank 0 replaces msrun's scheduler process. Kept on self:
                # rank 0 serves the store for the life of the job.
                timeout = datetime.timedelta(seconds=timeout_s)
                self._store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, env.rank == 0, timeout)
                management._init_with_store(backend=self.dist_backend, timeout=timeout, world_size=env.world_size,
                                            rank=env.rank, store=self._store)
        if management.get_rank() != env.rank:
            raise RuntimeError(f"MindSpore assigned rank {management.get_rank()} but the environment says {env.rank}")
        world = management.GlobalComm.WORLD_COMM_GROUP
        # send/recv/isend/irecv bound "hccl_world_group" as a default argument at import, so on CPU they look up a
        # group that does not exist unless its cached rank and size are seeded.
        for name in {"hccl_world_group", world}:
            _dist_impl._GROUP_RANK_CACHE[name] = env.rank
            _dist_impl._GROUP_SIZE_CACHE[name] = env.world_size
        self._barrier(Group(ranks=tuple(range(env.world_size)), native=world))
        return world

    def _new_group(self, ranks: tuple[int, ...], member: bool) -> Any:
        # Non-members that also create a group hang its members, so only members create it. The name is derived
        # from the ranks IN ORDER: every rank computes the same one, and create_group keeps that order as the
        # group-rank order (mint.new_group sorts the ranks, which would break Group.ranks' order).
        name = f"hyper_parallel_{len(ranks)}_" + hashlib.sha1("_".join(map(str, ranks)).encode()).hexdigest()
        if member and name not in self._groups:
            management.create_group(name, list(ranks))
            self._groups.add(name)
        return name

    def _destroy_process_group(self) -> None:
        # MindSpore cannot join a new world in this process afterwards ("AllReduce failed" after re-init).
        self._barrier(self._world)
        dist.destroy_process_group()
        self._groups.clear()

    def _barrier(self, group: Group) -> None:
        # dist.barrier() does not block on its first call in a process; reading a reduced tensor back always does.
        flag = ops.zeros((1,), mindspore.float32)
        dist.all_reduce(flag, "sum", group.native)
        flag.asnumpy()

    # ------------------------------------------------------------------ collectives
    @property
    def _native_kernels(self) -> bool:
        """Whether the device has all_to_all / all_gather_into_tensor / reduce_scatter kernels (not CPU)."""
        return self._target != "CPU"

    def _all_reduce(self, x, op: str, group: Group):
        out = _copy(x)
        if out.size:  # every member holds the same shape, so all of them skip an empty reduction together
            dist.all_reduce(out, op, group.native)
        return out

    def _all_gather_into_tensor(self, x, group: Group):
        out_shape = (x.shape[0] * group.size, *x.shape[1:])
        if not x.size:
            return ops.zeros(out_shape, x.dtype)
        if self._native_kernels:
            out = mint.empty(out_shape, dtype=x.dtype)
            dist.all_gather_into_tensor(out, x, group.native)
            return out
        parts = [mint.empty_like(x) for _ in group.ranks]
        dist.all_gather(parts, x, group.native)
        return mint.cat(parts)

    def _reduce_scatter_tensor(self, x, op: str, group: Group):
        rows = x.shape[0] // group.size
        if self._native_kernels and x.size:
            out = mint.empty((rows, *x.shape[1:]), dtype=x.dtype)
            dist.reduce_scatter_tensor(out, x, op, group.native)
            return out
        start = group.ranks.index(self._rank) * rows
        # Copy the slice: a view would keep the whole reduced tensor alive.
        return _copy(self._all_reduce(x, op, group)[start:start + rows])

    def _all_to_all_single(self, x, output_shape, input_splits, output_splits, group: Group, async_op: bool):
        if self._native_kernels:
            out = mint.empty(output_shape, dtype=x.dtype)
            work = dist.all_to_all_single(out, x, output_splits, input_splits, group.native, async_op)
            return out, (work.wait if async_op else None)
        me = group.ranks.index(self._rank)
        send_at = np.cumsum([0, *input_splits]).tolist()
        parts, works = [], []
        for j, peer in enumerate(group.ranks):
            chunk = x[send_at[j]:send_at[j] + input_splits[j]] if input_splits[j] else None
            if j == me:
                parts.append(_copy(chunk) if chunk is not None else None)
                continue
            # Skip zero-size messages: the peer skips the matching receive, as it sees the same split sizes. The
            # messages go through the world group (peers are global ranks): in a subgroup whose ranks are not
            # ascending, mccl routes a message back to its sender.
            if chunk is not None:
                works.append(dist.isend(_copy(chunk), peer, self._world.native))
            if output_splits[j]:
                parts.append(mint.empty((output_splits[j], *output_shape[1:]), dtype=x.dtype))
                works.append(dist.irecv(parts[-1], peer, self._world.native))
            else:
                parts.append(None)
        for work in works:
            work.wait()
        parts = [p for p in parts if p is not None]
        return (mint.cat(parts) if parts else ops.zeros(output_shape, x.dtype)), None

    def _broadcast(self, x, src: int, group: Group):
        out = _copy(x)
        if out.size:
            dist.broadcast(out, src, group.native)
        return out

    # ------------------------------------------------------------------ autograd
    def autograd_function(self, forward: Callable, backward: Callable) -> Callable:
        return lambda x: _ClosureFunction.apply(x, forward, backward)

    def value_and_grad(self, fn: Callable, inputs: Sequence, params: Sequence = ()) -> tuple:
        inputs, params = tuple(inputs), list(params)
        if not inputs and not params:
            return fn(), (), ()
        value, grads = mindspore.value_and_grad(
            fn, grad_position=tuple(range(len(inputs))) if inputs else None, weights=params or None
        )(*inputs)
        input_grads, param_grads = grads if inputs and params else (grads, ()) if inputs else ((), grads)
        # A single grad_position comes back as a bare tensor, not a 1-tuple.
        if isinstance(input_grads, mindspore.Tensor):
            input_grads = (input_grads,)
        return value, tuple(input_grads), tuple(param_grads)

    # ------------------------------------------------------------------ factories
    _DTYPES = {name: getattr(mindspore, "bool_" if name == "bool" else name) for name in DTYPE_NAMES}
    _NAMES = {native: name for name, native in _DTYPES.items()}

    def dtype(self, name: str):
        if isinstance(name, mindspore.dtype.Type):
            return name
        if name not in self._DTYPES:
            raise ValueError(f"unknown dtype name {name!r}; valid names: {list(DTYPE_NAMES)}")
        return self._DTYPES[name]

    def dtype_name(self, dtype) -> str:
        return self._NAMES.get(dtype, str(dtype).lower())

    def arange(self, end: int, *, dtype: str = "int64", device=None):
        # mint.arange has no CPU kernel; ops.arange does.
        return ops.arange(end, dtype=self.dtype(dtype))

    def zeros(self, shape: Sequence[int], *, dtype: str = "float32", device=None):
        return ops.zeros(tuple(shape), self.dtype(dtype))

    def empty(self, shape: Sequence[int], *, dtype: str = "float32", device=None):
        return mint.empty(tuple(shape), dtype=self.dtype(dtype))

    def cat(self, tensors: Sequence, dim: int = 0):
        return mint.cat(list(tensors), dim)

    def tensor(self, data: Sequence, *, dtype: str = "float32", device=None):
        return mindspore.Tensor(data, dtype=self.dtype(dtype))

    def _tolist(self, x) -> list:
        # numpy has no bfloat16: asnumpy() refuses it, float32 holds every bfloat16 value exactly.
        if x.dtype == mindspore.bfloat16:
            x = x.astype(mindspore.float32)
        return x.asnumpy().tolist()

    # ------------------------------------------------------------------ modules
    def named_modules(self, module) -> list:
        return list(module.cells_and_names())

    def named_parameters(self, module) -> list:
        return list(module.parameters_and_names())

    def replace_parameter(self, module, name: str, tensor):
        old = getattr(module, name)
        # Keep the old Parameter's name: MindSpore optimizers and checkpoints key parameters by it.
        param = mindspore.Parameter(_copy(tensor), name=old.name, requires_grad=old.requires_grad)
        setattr(module, name, param)
        return param

    def manual_seed(self, seed: int) -> None:
        mindspore.set_seed(seed)
        np.random.seed(seed)

    def profile_range(self, name: str):
        # MindSpore's host-side range (what mindspore.profiler.Profiler records around Python code); its public
        # export is missing in 2.10, the class lives in profiler.common.
        return RecordFunction(name)
