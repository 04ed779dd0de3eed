"""PyTorch adapter: gloo on CPU, NCCL on CUDA.

The base class has already validated every argument (splits, membership, dtypes) when a ``_`` method here runs.

On CUDA the adapter's :class:`TorchKernels` replace two neutral references with fast paths (see
``docs/benchmarks.md`` for their timings):

* :meth:`TorchKernels.permute_slots`, the dispatch index build: one fused Triton kernel when Triton imports, else
  the eager ops captured once in a CUDA graph, else the eager ops with ``output_size`` (no hidden device-to-host
  sync). ``TorchKernels.permute_slots_impl`` forces one of them.
* :meth:`TorchKernels.grouped_mm`: ``torch._grouped_mm`` for bf16 on sm90/sm100, the neutral per-expert loop
  otherwise.

The kernels and their eligibility checks live in :mod:`platform_adapters._torch_cuda`; this module decides.

Host-to-device copies of small host data (:meth:`TorchPlatform.tensor`) go through pinned memory without blocking,
so a dispatch keeps exactly one device-to-host sync (its ``tolist``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import itertools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from hyper_parallel.kernels import Kernels
from hyper_parallel.platform import DTYPE_NAMES, Group, Platform, Rendezvous, WorldEnv
from platform_adapters._torch_cuda import (  # noqa: F401 - re-exported: tests and benchmarks reach them here
    PAIRS_IMPLS,
    PERMUTE_ROWS_IMPLS,
    PERMUTE_SLOTS_IMPLS,
    PINNED_COPY_MAX_BYTES,
    GraphedSlots,
    choose_permute_impl,
    graph_capacity,
    grouped_mm_device_ok,
    grouped_mm_layout_ok,
    host_copy_mode,
    host_tensor,
    permute_slots_eager,
    permute_slots_padded,
    swiglu_fused,
    tl,
    triton,
)

try:
    from platform_adapters._torch_cuda import (
        combine_pairs_triton,
        gather_pairs_triton,
        permute_rows_triton,
        permute_slots_triton,
    )
except ImportError:  # Triton is not installed
    pass

_log = logging.getLogger("hyper_parallel.platform_adapters.torch")  # under the library logger
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

# gloo's all_reduce and all_gather take several rounds of messages where an all_to_all_single takes one; for small
# tensors the rounds are the cost (measured on a 2-core CPU: all_reduce of 0.1-64 KB 1.2-1.7 ms at 2 ranks and 6.5-7.1
# ms at 4, against 0.34-0.50 and 1.7-2.2 ms for one all_to_all_single of the tensor repeated to every member; an
# all_gather 3.7-4.4 ms against 1.9-2.2 at 4 ranks). Up to this many bytes per member, gloo runs both as that
# exchange; beyond it as themselves (512 KB: mixed, 0.9-1.7x; 4 MB: gloo's all_reduce ring wins, 0.4-0.5x).
_GLOO_EXCHANGE_MAX_BYTES = 64 * 1024

# newer torch renames all_gather_into_tensor to all_gather_single (the old name warns on every call)
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_UNCAUGHT: list = []
"""The types of the exceptions that ended the main thread (recorded by the hook :func:`_watch_uncaught` installs)."""


_LINE_UP_S = 10.0
"""Seconds a rank leaving its world waits for the others (see ``TorchPlatform._destroy_process_group``)."""


def _watch_uncaught() -> None:
    """Record an uncaught exception before the previous ``sys.excepthook`` reports it (chained, once)."""
    previous = sys.excepthook
    if getattr(previous, "_hyper_parallel", False):
        return

    def hook(kind, value, tb):
        _UNCAUGHT.append(kind)
        previous(kind, value, tb)

    hook._hyper_parallel = True
    sys.excepthook = hook


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


class TorchKernels(Kernels):
    """The torch adapter's kernels: CUDA fast paths where they apply, the neutral references elsewhere."""

    #: Which index build :meth:`permute_slots` runs: ``"auto"`` or one forced (see :func:`choose_permute_impl`).
    permute_slots_impl = "auto"
    #: How dispatch moves its rows (see ``PERMUTE_ROWS_IMPLS``): ``"auto"``, ``"triton"`` or ``"gather"``.
    permute_rows_impl = "auto"
    #: How :meth:`gather_pairs` (its backward) and :meth:`combine_pairs` run (see ``PAIRS_IMPLS``): ``"auto"``,
    #: ``"triton"`` or ``"reference"``.
    pairs_impl = "auto"

    def __init__(self, platform) -> None:
        super().__init__(platform)
        self._broken_impls: frozenset = frozenset()  # auto-chosen index builds that failed once, skipped since
        self._graphs: dict = {}  # captured index builds by (device, R, E, capacity)
        self._group_ends_cache: tuple = (None, None)  # (key, int32 group ends) of the last grouped_mm counts

    _host_index_build: bool | None = None  # set: forced (tests); None: by device

    @property
    def host_index_build(self) -> bool:
        """On a CPU, the dispatch permutation is built with NumPy from the host counts
        (:func:`~hyper_parallel.expert_parallel.permute.host_permute_indices`): measured on a 2-core machine with one
        thread, 1.6-4.8x faster than the vectorized torch ops at every size of ``hyper-parallel bench`` (44-270 us
        against 81-1,180 us, 1,024 to 65,536 rows, 2x4 to 8x16 blocks), and faster than a per-block loop except at
        many rows in few blocks (249 against 211 us at 65,536 rows, 2x4). On an accelerator the device builds it (a
        host build would be a copy to the device per dispatch)."""
        if self._host_index_build is not None:
            return self._host_index_build
        return self.platform.device_type == "cpu"

    @host_index_build.setter
    def host_index_build(self, value: bool) -> None:
        self._host_index_build = bool(value)

    def use_fused_permute(self, counts_RE) -> bool:
        return self._triton_for("permute_rows", self.permute_rows_impl, counts_RE)

    def permute_rows(self, x, counts_RE, num_ranks: int, num_local_experts: int, expert_offsets_E, num_rows: int,
                     num_slots: int, to_expert_major: bool):
        args = (x, counts_RE, num_ranks, num_local_experts, expert_offsets_E, num_rows, num_slots, to_expert_major)
        if not self._triton_for("permute_rows", self.permute_rows_impl, x):
            return super().permute_rows(*args)
        return self._fast_or_reference("permute_rows", self.permute_rows_impl, "the rows move through an index",
                                       lambda: permute_rows_triton(*args), lambda: super().permute_rows(*args))

    def gather_pairs(self, x_TD, pairs_N, top_k: int):
        if x_TD.dim() != 2 or not self._triton_for("pairs", self.pairs_impl, x_TD):
            return super().gather_pairs(x_TD, pairs_N, top_k)
        return self._fast_or_reference("pairs", self.pairs_impl, "the pairs go through autograd's scatter",
                                       lambda: gather_pairs_triton(x_TD, pairs_N, top_k),
                                       lambda: super(TorchKernels, self).gather_pairs(x_TD, pairs_N, top_k))

    def combine_pairs(self, rows_ND, scores_N, pairs_N, num_tokens: int, top_k: int):
        args = (rows_ND, scores_N, pairs_N, num_tokens, top_k)
        if rows_ND.dim() != 2 or rows_ND.shape[0] == 0 or not self._triton_for("pairs", self.pairs_impl, rows_ND):
            return super().combine_pairs(*args)
        return self._fast_or_reference("pairs", self.pairs_impl, "the pairs go through autograd's scatter",
                                       lambda: combine_pairs_triton(*args),
                                       lambda: super(TorchKernels, self).combine_pairs(*args))

    def _triton_for(self, name: str, impl: str, x) -> bool:
        """Whether kernel ``name`` (its ``*_impl`` setting ``impl``) runs its Triton version on ``x``: forced, or
        ``"auto"`` on a CUDA tensor while it has not failed in this process.

        Raises:
            ValueError: ``impl`` is not one of the kernel's settings.
            RuntimeError: Triton is forced but does not import.
        """
        allowed = PERMUTE_ROWS_IMPLS if name == "permute_rows" else PAIRS_IMPLS
        if impl not in allowed:
            raise ValueError(f"{name}_impl must be one of {list(allowed)}, got {impl!r}")
        if impl == "triton" and triton is None:
            raise RuntimeError(f"{name}_impl='triton' needs the triton package, which does not import")
        if impl != "auto":
            return impl == "triton"
        return x.is_cuda and triton is not None and name not in self._broken_impls

    def _fast_or_reference(self, name: str, impl: str, instead: str, fast: Callable, reference: Callable):
        """``fast()``; when it raises and the kernel was not forced, a warning, the reference, and the reference
        for the rest of this process."""
        try:
            return fast()
        except Exception as e:
            if impl == "triton":
                raise
            message = (f"{name}: the Triton kernel failed ({type(e).__name__}: {e}); {instead} for the rest of this "
                       "process")
            _log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self._broken_impls = self._broken_impls | {name}
            return reference()

    def take_rows(self, x, index_N):
        # on CPU index_select: 16 us against 100 us for x[i] at 1,024 x 128 float32 rows, 484 against 1,437 at 16,384
        # (one thread, 2026-12-01); the same values. On CUDA both are one gather kernel: the reference.
        return x[index_N] if x.is_cuda else torch.index_select(x, 0, index_N)

    def swiglu(self, h, g):
        # on CUDA one fused silu kernel instead of a sigmoid and two multiplies, each a pass over [N, H] (and
        # fewer saved tensors for backward); elsewhere the reference, so CPU results stay those of every backend
        return swiglu_fused(h, g) if h.is_cuda else super().swiglu(h, g)

    def permute_slots(self, counts_RE, num_ranks: int, num_local_experts: int, num_rows: int, expert_offsets_E):
        counts_RE = counts_RE.reshape(-1)
        auto = self.permute_slots_impl == "auto"
        while True:
            impl = choose_permute_impl(
                self.permute_slots_impl, counts_RE.device.type, triton_usable=triton is not None,
                capturing=counts_RE.is_cuda and torch.cuda.is_current_stream_capturing(), broken=self._broken_impls)
            try:
                return self._permute_slots_with(impl, counts_RE, num_ranks, num_local_experts, num_rows,
                                                expert_offsets_E)
            except Exception as e:
                if not auto or impl in ("eager", "neutral"):
                    raise
                message = (f"permute_slots: the {impl} index build failed ({type(e).__name__}: {e}); falling back "
                           "to the next implementation for the rest of this process")
                _log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self._broken_impls = self._broken_impls | {impl}

    def _permute_slots_with(self, impl: str, counts_RE, R: int, E: int, T: int, expert_offsets_E):
        if impl == "neutral":
            return super().permute_slots(counts_RE, R, E, T, expert_offsets_E)
        if impl == "eager":
            return permute_slots_eager(counts_RE, R, E, T, expert_offsets_E)
        if impl == "triton":
            if triton is None:
                raise RuntimeError("permute_slots_impl='triton' needs the triton package, which does not import")
            return permute_slots_triton(counts_RE, R, E, T, expert_offsets_E)
        key = (counts_RE.device, R, E, graph_capacity(T))  # pragma: no cover - graph: CUDA only
        if key not in self._graphs:  # pragma: no cover
            self._graphs[key] = GraphedSlots(*key)
        return self._graphs[key](counts_RE, T, expert_offsets_E)  # pragma: no cover

    def grouped_mm(self, x_NK, w_EKM, num_tokens_per_expert: Sequence[int]):
        counts = [int(n) for n in num_tokens_per_expert]
        fits = (len(counts) == w_EKM.shape[0] and sum(counts) == x_NK.shape[0] and (not counts or min(counts) >= 0)
                and w_EKM.device == x_NK.device)
        if not (fits and grouped_mm_device_ok(x_NK.device) and grouped_mm_layout_ok(x_NK, w_EKM)):
            return super().grouped_mm(x_NK, w_EKM, counts)  # the reference, which also raises on bad counts
        return self._grouped_mm_fast(x_NK, w_EKM, counts)

    def _grouped_mm_fast(self, x_NK, w_EKM, counts: list[int]):
        """``torch._grouped_mm`` with the counts as int32 group ends on the device. One expert layer calls it three
        times with the same counts, so the ends are copied once."""
        key = (x_NK.device, tuple(counts))
        if self._group_ends_cache[0] != key:
            ends = self.platform.tensor(list(itertools.accumulate(counts)), dtype="int32", device=x_NK.device)
            self._group_ends_cache = (key, ends)
        return torch._grouped_mm(x_NK, w_EKM, offs=self._group_ends_cache[1])


class TorchPlatform(Platform):
    """PyTorch through ``torch.distributed``: gloo on CPU, NCCL when CUDA is available."""

    def __init__(self) -> None:
        super().__init__()
        self._device = torch.device("cpu")
        self.kernels = TorchKernels(self)
        self._store: dist.TCPStore | None = None  # the rendezvous store, kept for re-created worlds
        self._store_key: tuple | None = None
        self._worlds_joined = 0
        self._exit_hook = False
        self._rendezvous: Rendezvous | None = None  # the joined world's, for its teardown barrier

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
            rendezvous = Rendezvous(env, timeout_s, generation=self._worlds_joined)
            self._worlds_joined += 1
            store = self._rendezvous_store(rendezvous)
            rendezvous.join(store)
            self._rendezvous = rendezvous
            if not self._exit_hook:
                _watch_uncaught()
                atexit.register(self._leave_at_exit)
                self._exit_hook = True
            # Start-up is checked: from here on the store waits as long as a collective may.
            store.set_timeout(datetime.timedelta(seconds=timeout_s))
            # NCCL: binding the device makes the communicator eager and bound to it (no guessing from the rank)
            bound = {"device_id": self._device} if self._device.type == "cuda" else {}
            dist.init_process_group(
                backend=self.dist_backend,
                # each world of this process under its own keys (see _rendezvous_store)
                store=dist.PrefixStore(f"hyper_parallel/world/{rendezvous.namespace}", store),
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                **bound,
            )
        return dist.group.WORLD

    def _leave_at_exit(self) -> None:
        """Leave a gloo world still joined when the interpreter exits, while Python is fully alive (registered once
        per process by :meth:`_init_process_group`).

        A gloo process group torn down during the interpreter's finalization aborts the process when its worker
        threads release their last work (SIGABRT, "terminate called without an active exception": 3 runs of 12 of a
        2-rank script ending after a dispatch without ``destroy_process_group()``). Not after an uncaught exception
        (the peers may still be inside a collective with this rank, and tearing the group down could wait for
        them), and not on NCCL, where this was not seen."""
        if self._world is not None and self.dist_backend == "gloo" and not _UNCAUGHT:
            try:
                self.destroy_process_group()
            except (RuntimeError, ValueError, OSError) as e:  # exiting anyway: say why the world was not left
                _log.warning("leaving the process group at exit failed: %s: %s", type(e).__name__, e)

    def _rendezvous_store(self, rendezvous: Rendezvous) -> dist.TCPStore:
        """The world's TCPStore, created once per process and address, and kept across destroy_process_group.

        Kept because a world re-created in this process must not read the keys of the previous one: with torch's
        own ``tcp://`` init, rank 0 shares one store server per port inside a process (multi-tenant) and it
        outlives ``destroy_process_group`` while anything (an old mesh) holds the old groups, so the second world's
        gloo read the first world's peer addresses and failed connecting to closed ports (or hung). Here every world
        uses the same store under its own prefix.
        """
        env = rendezvous.env
        key = (rendezvous.address, env.master_port, env.world_size, env.rank, env.agent_store)
        if self._store is not None and self._store_key == key:
            return self._store
        timeout = datetime.timedelta(seconds=rendezvous.start_timeout_s)  # reaching the store is part of start-up
        if rendezvous.is_master:
            # torch's TCPStore listens on every interface whatever host_name says (measured with torch 2.13, libuv
            # and legacy servers alike: '::' in /proc/net/tcp6 for host_name='127.0.0.1'); only a socket bound here
            # and handed over as master_listen_fd keeps a local launch's store on loopback. Binding here also
            # turns a busy port into an error naming MASTER_PORT. The store owns (and closes) the fd from here on.
            fd = rendezvous.listen_socket().detach()
        else:
            fd = None
            rendezvous.wait_for_master()
        store = rendezvous.open_store(lambda: dist.TCPStore(
            rendezvous.address, env.master_port, env.world_size, rendezvous.is_master, timeout,
            wait_for_workers=False, master_listen_fd=fd))
        self._store, self._store_key = store, key
        return store

    def _new_group(self, ranks: tuple[int, ...], member: bool) -> Any:
        # torch wants every rank to take part in creating every group. It orders a group's members by global rank
        # unless told not to, while the contract's group-rank order is the order given (a mesh [1, 0] must gather
        # rank 1's data first): keep the order where torch can, refuse where it cannot (older torch).
        if list(ranks) == sorted(ranks):
            return dist.new_group(list(ranks))
        if "sort_ranks" not in inspect.signature(dist.new_group).parameters:
            raise ValueError(f"new_group: torch {torch.__version__} orders a group's members by global rank, so a "
                             f"group over ranks {list(ranks)} (in that order) cannot be made; list them ascending, "
                             "or use torch >= 2.6")
        return dist.new_group(list(ranks), sort_ranks=False)

    def _destroy_process_group(self) -> None:
        dcp = sys.modules.get("hyper_parallel.integrations.torch_dcp")
        if dcp is not None:  # its torch meshes hold the groups being destroyed
            dcp.forget_torch_meshes()
        rendezvous, self._rendezvous = self._rendezvous, None
        if rendezvous is not None and dist.is_initialized():
            # Line the ranks up first, through the store, not a collective: a gloo rank that tears its pairs down
            # while a peer still finishes the last collective with it aborted that peer (SIGABRT, "terminate called
            # without an active exception": 12 runs of 32 of a 2-rank script ending with a plain all_reduce). A
            # peer inside a collective with this rank is moments away; one still busy with other work (rank 0
            # saving alone) has no collective with it to break, so the others' line-up is bounded and teardown
            # follows. The store's host waits for every rank (within the process-group timeout): its store must
            # outlive their last calls to it.
            try:
                rendezvous.leave(self._store, timeout_s=None if rendezvous.is_master else
                                 min(rendezvous.timeout_s, _LINE_UP_S))
            except RuntimeError as e:
                _log.info("left the world without every rank lined up (%s)", e)
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
    def _small_on_gloo(self, x, group: Group) -> bool:
        return self.dist_backend == "gloo" and group.size > 1 and \
            x.numel() * x.element_size() <= _GLOO_EXCHANGE_MAX_BYTES

    def _every_members(self, x, group: Group):
        """``[group.size, *x.shape]``: every member's ``x`` in group-rank order, through one all_to_all_single."""
        x = x.detach().contiguous()
        out = x.new_empty((group.size, *x.shape))
        self._issue(dist.all_to_all_single, out, x.expand(group.size, *x.shape).contiguous(), group=group.native)
        return out

    def _all_reduce(self, x, op: str, group: Group):
        if self._small_on_gloo(x, group):
            # every member reduces the same rows in the same order: the same result everywhere
            every = self._every_members(x, group)
            if op == "max":
                return every.amax(0)
            total = every.sum(0, dtype=x.dtype)
            return total.div_(group.size) if op == "avg" else total
        out = x.detach().clone()
        if op == "avg":
            # gloo has no AVG; sum then divide gives the same result on every backend.
            self._issue(dist.all_reduce, out, op=dist.ReduceOp.SUM, group=group.native)
            return out.div_(group.size)
        self._issue(dist.all_reduce, out, op=_REDUCE_OPS[op], group=group.native)
        return out

    def _all_gather_into_tensor(self, x, group: Group):
        if self._small_on_gloo(x, group):
            return self._every_members(x, group).reshape(x.shape[0] * group.size, *x.shape[1:])
        x = x.detach().contiguous()
        out = x.new_empty((x.shape[0] * group.size, *x.shape[1:]))
        self._issue(_ALL_GATHER_SINGLE, out, x, group=group.native)
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
        device = torch.device(device) if device is not None else self._device
        host = host_tensor(data, self.dtype(dtype))
        # under torch.compile the copy is traced (fake tensors have no pinned memory): a plain one
        if host_copy_mode(device.type, host.numel() * host.element_size()) == "pinned" \
                and not torch.compiler.is_compiling():
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def _tolist(self, x) -> list:
        return x.detach().cpu().tolist()

    def _to_numpy(self, x):
        x = x.detach()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds each value exactly
            x = x.float()
        return x.cpu().numpy()

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

    def _assign(self, param, value) -> None:
        with torch.no_grad():
            param.copy_(value)

    def register_sharded_state_dict(self, module) -> None:
        # Imported here: the DCP bridge pulls in torch.distributed.tensor, which only sharded models need.
        from hyper_parallel.integrations.torch_dcp import register_state_dict_hooks

        register_state_dict_hooks(module)

    def recompute_phase(self) -> str | None:
        # A forward that runs while the autograd engine executes a graph is a checkpoint's recomputation (reentrant
        # or not): torch runs no other forward inside backward. torch's first run tracks autograd as usual.
        return "again" if torch._C._current_graph_task_id() != -1 else None

    def register_gradient_reducer(self, module, reducer) -> None:
        # Imported here: only data-parallel models need the backward hooks.
        from hyper_parallel.integrations.torch_data_parallel import install

        install(module, reducer)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def profile_range(self, name: str):
        # a range costs 5-7 us of host time even with no profiler running (a dispatch + combine opens five, a MoE
        # layer's forward five more): none then. torch.profiler and emit_nvtx both turn this on. torch.compile ignores
        # ranges (with a warning), and asking the profiler there would break the graph: none either.
        if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
            return contextlib.nullcontext()
        return torch.profiler.record_function(name)
