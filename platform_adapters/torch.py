"""PyTorch adapter: gloo on CPU, NCCL on CUDA.

The base class has already validated every argument (splits, membership, dtypes) when a ``_`` method here runs.

On CUDA the adapter replaces two neutral references with fast paths (see ``docs/benchmarks.md`` for their timings):

* :meth:`TorchPlatform.permute_slots`, the dispatch index build: one fused Triton kernel when Triton imports, else
  the eager ops captured once in a CUDA graph, else the eager ops with ``output_size`` (no hidden device-to-host
  sync). ``TorchPlatform.permute_slots_impl`` forces one of them.
* :meth:`TorchPlatform.grouped_mm`: ``torch._grouped_mm`` for bf16 on sm90/sm100, the neutral per-expert loop
  otherwise.

Host-to-device copies of small host data (:meth:`TorchPlatform.tensor`) go through pinned memory without blocking,
so a dispatch keeps exactly one device-to-host sync (its ``tolist``).
"""

from __future__ import annotations

import array
import contextlib
import datetime
import itertools
import os
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from hyper_parallel.platform import DTYPE_NAMES, Group, Platform, WorldEnv

try:  # optional: without Triton the CUDA index build is a captured graph
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - a broken Triton install must not break the adapter, only lose one fast path
    triton = tl = None

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

#: Host data up to this size goes to the GPU through pinned memory without blocking (see ``TorchPlatform.tensor``).
PINNED_COPY_MAX_BYTES = 1 << 20

#: Index builds ``TorchPlatform.permute_slots_impl`` may name; ``"auto"`` picks (see :func:`choose_permute_impl`).
PERMUTE_SLOTS_IMPLS = ("auto", "triton", "graph", "eager", "neutral")


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


_ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float64: "d", torch.float32: "f"}


def host_tensor(data, dtype):
    """``torch.tensor(data, dtype=dtype)`` on the host. A flat list of numbers (counts, offsets: what dispatch
    builds) goes through ``array.array``, several times faster than torch reading Python objects one by one."""
    code = _ARRAY_CODES.get(dtype)
    if code is not None and type(data) in (list, tuple) and data:
        try:
            return torch.frombuffer(array.array(code, data), dtype=dtype)
        except (TypeError, OverflowError):  # nested, or values the type cannot hold: torch decides as before
            pass
    return torch.tensor(data, dtype=dtype)


def host_copy_mode(device_type: str, nbytes: int) -> str:
    """How :meth:`TorchPlatform.tensor` moves host data to ``device_type``: ``"pinned"`` (non-blocking, from pinned
    memory) or ``"plain"``. On CUDA a copy from pageable memory makes the host wait for the GPU to drain, a hidden
    sync inside dispatch; from pinned memory it is queued on the stream like a kernel (the caching host allocator
    keeps the pinned block until the copy is done). Bulk data (initial weights) is copied plainly: blocking there is
    harmless and pins no memory."""
    return "pinned" if device_type == "cuda" and nbytes <= PINNED_COPY_MAX_BYTES else "plain"


# ---------------------------------------------------------------------- CUDA index build (permute_slots)
# A row's slot is its own rank-major index plus a shift that is constant over its (rank, expert) block: the block's
# destination start minus its source start. Every variant below computes that; they differ in how many launches
# and host syncs it costs.

def slot_shift_RE(counts_RE, num_ranks: int, num_local_experts: int, expert_offsets_E):
    """Destination start minus source start of every (rank, expert) block, rank-major; int64 ``[R*E]``."""
    R, E = num_ranks, num_local_experts
    counts_ER = counts_RE.reshape(R, E).t()
    dst_start_RE = (expert_offsets_E.reshape(E, 1) + counts_ER.cumsum(1) - counts_ER).t().reshape(-1)
    return dst_start_RE - (counts_RE.cumsum(0) - counts_RE)


def permute_slots_eager(counts_RE, num_ranks: int, num_local_experts: int, num_rows: int, expert_offsets_E):
    """The neutral index build in 6 launches. ``output_size`` matters: without it repeat_interleave reads the
    total back from the GPU to size its output, a hidden device-to-host sync in the middle of dispatch."""
    counts_RE = counts_RE.reshape(-1)
    shift_RE = slot_shift_RE(counts_RE, num_ranks, num_local_experts, expert_offsets_E)
    return shift_RE.repeat_interleave(counts_RE, output_size=num_rows) + torch.arange(num_rows,
                                                                                      device=counts_RE.device)


def permute_slots_padded(counts_ext, num_ranks: int, num_local_experts: int, capacity: int, expert_offsets_E):
    """:func:`permute_slots_eager` over ``capacity >= T`` rows, whose shapes depend on ``capacity`` alone, so one
    captured graph serves every ``T`` up to it. ``counts_ext`` is ``counts_RE`` plus one trailing block holding the
    ``capacity - T`` extra rows; the first ``T`` entries of the result are the slots."""
    shift_RE = slot_shift_RE(counts_ext[:-1], num_ranks, num_local_experts, expert_offsets_E)
    shift_ext = torch.cat([shift_RE, shift_RE.new_zeros(1)])
    return shift_ext.repeat_interleave(counts_ext, output_size=capacity) + torch.arange(capacity,
                                                                                         device=counts_ext.device)


def graph_capacity(num_rows: int) -> int:
    """Rows a captured index build is sized for: the next power of two (at least 1024), so a training run whose
    token counts move around captures a handful of graphs, not one per step."""
    return max(1024, 1 << (num_rows - 1).bit_length())


class GraphedSlots:  # pragma: no cover - needs a CUDA device; benchmarks/gpu_ep.py checks it against the reference
    """:func:`permute_slots_padded` captured once in a CUDA graph for one (device, R, E, capacity): each call is
    three small copies, one replay and one clone instead of the eager launches."""

    def __init__(self, device, num_ranks: int, num_local_experts: int, capacity: int):
        self.capacity = capacity
        self.counts_ext = torch.zeros(num_ranks * num_local_experts + 1, dtype=torch.int64, device=device)
        self.counts_ext[-1] = capacity  # a valid input for warm-up and capture: every row in the extra block
        self.offsets_E = torch.zeros(num_local_experts, dtype=torch.int64, device=device)
        build = lambda: permute_slots_padded(self.counts_ext, num_ranks, num_local_experts,  # noqa: E731
                                             capacity, self.offsets_E)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture: library workspaces are allocated here
            build()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread polls its events while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.slots_ext = build()

    def __call__(self, counts_RE, num_rows: int, expert_offsets_E):
        self.counts_ext[:-1].copy_(counts_RE.reshape(-1))
        self.counts_ext[-1:].fill_(self.capacity - num_rows)
        self.offsets_E.copy_(expert_offsets_E)
        self.graph.replay()
        return self.slots_ext[:num_rows].clone()  # the next replay overwrites slots_ext


if triton is not None:  # pragma: no cover - Triton is no CI dependency; tests run it under TRITON_INTERPRET=1

    @triton.jit(do_not_specialize=["num_rows"])
    def _permute_slots_kernel(counts_ptr, offsets_ptr, slots_ptr, num_rows, num_blocks,
                              NUM_LOCAL_EXPERTS: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr):
        # One program per (rank, expert) block, rank-major. Its source start is the sum of the counts before it;
        # its destination start is its expert's group start plus the counts of the same expert from lower ranks.
        block = tl.program_id(0)
        expert = block % NUM_LOCAL_EXPERTS
        lane = tl.arange(0, CHUNK)
        before = tl.zeros([CHUNK], dtype=tl.int64)
        same_expert_before = tl.zeros([CHUNK], dtype=tl.int64)
        for first in range(0, block, CHUNK):
            idx = first + lane
            n = tl.load(counts_ptr + idx, mask=idx < block, other=0).to(tl.int64)
            before += n
            same_expert_before += tl.where(idx % NUM_LOCAL_EXPERTS == expert, n, 0)
        src_start = tl.sum(before, axis=0)
        dst_start = tl.load(offsets_ptr + expert).to(tl.int64) + tl.sum(same_expert_before, axis=0)
        count = tl.load(counts_ptr + block).to(tl.int32)
        k = tl.arange(0, ROWS)
        for first in range(0, count, ROWS):
            row = first + k
            # the num_rows bound keeps counts that disagree with num_rows from writing out of bounds
            tl.store(slots_ptr + src_start + row, dst_start + row, mask=(row < count) & (src_start + row < num_rows))

    def permute_slots_triton(counts_RE, num_ranks: int, num_local_experts: int, num_rows: int, expert_offsets_E):
        """The index build in one launch (one program per (rank, expert) block)."""
        counts_RE = counts_RE.reshape(-1).contiguous()
        slots = torch.empty(num_rows, dtype=torch.int64, device=counts_RE.device)
        blocks = num_ranks * num_local_experts
        chunk = min(1024, triton.next_power_of_2(max(blocks, 16)))
        # Triton launches on the current device, which need not be the tensors' one
        with torch.cuda.device(counts_RE.device) if counts_RE.is_cuda else contextlib.nullcontext():
            _permute_slots_kernel[(blocks,)](counts_RE, expert_offsets_E.contiguous(), slots, num_rows, blocks,
                                             NUM_LOCAL_EXPERTS=num_local_experts, CHUNK=chunk, ROWS=256,
                                             num_warps=4)
        return slots


def choose_permute_impl(requested: str, device_type: str, *, triton_usable: bool, capturing: bool,
                        broken: frozenset = frozenset()) -> str:
    """The index build :meth:`TorchPlatform.permute_slots` runs.

    ``"auto"`` keeps the neutral reference off CUDA (on a CPU its ops cost no sync and few launches) and, on CUDA,
    takes the first of Triton, a captured graph and the eager ops that is usable: Triton needs the package, a graph
    cannot be captured while the stream is already capturing, and an implementation that failed once (``broken``)
    is skipped. A forced implementation is returned as it is.

    Raises:
        ValueError: ``requested`` is not one of :data:`PERMUTE_SLOTS_IMPLS`.
    """
    if requested not in PERMUTE_SLOTS_IMPLS:
        raise ValueError(f"permute_slots_impl must be one of {list(PERMUTE_SLOTS_IMPLS)}, got {requested!r}")
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "neutral"
    if triton_usable and "triton" not in broken:
        return "triton"
    if not capturing and "graph" not in broken:
        return "graph"
    return "eager"


# ---------------------------------------------------------------------- grouped GEMM (grouped_mm)

def _grouped_mm_operand_ok(t) -> bool:
    # CUTLASS reads operands with 16-byte TMA loads: an aligned base, one unit stride in the last two dims and
    # every other stride a multiple of 16 bytes.
    step = 16 // t.element_size()
    inner = t.stride()[-2:]
    if t.data_ptr() % 16 or 1 not in inner or any(s % step for s in t.stride() if s != 1):
        return False
    return min(t.shape[-2:]) > 0


def grouped_mm_layout_ok(x_NK, w_EKM) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands on its fast path (device aside): bf16 both, ``[N, K]``
    times ``[E, K, M]``, 16-byte aligned strides."""
    return (x_NK.dtype == torch.bfloat16 and w_EKM.dtype == torch.bfloat16 and x_NK.dim() == 2
            and w_EKM.dim() == 3 and x_NK.shape[1] == w_EKM.shape[1] and x_NK.shape[0] > 0
            and _grouped_mm_operand_ok(x_NK) and _grouped_mm_operand_ok(w_EKM))


def grouped_mm_device_ok(device) -> bool:
    """Whether ``torch._grouped_mm`` has its fast kernel on ``device``: CUTLASS on sm90 and sm100. Elsewhere (and
    for fp32) torch falls back to a loop that reads the offsets back to the host, worse than the neutral loop, which
    has the counts on the host already."""
    return (device.type == "cuda" and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


class TorchPlatform(Platform):
    """PyTorch through ``torch.distributed``: gloo on CPU, NCCL when CUDA is available."""

    #: Which index build :meth:`permute_slots` runs: ``"auto"`` or one forced (see :func:`choose_permute_impl`).
    permute_slots_impl = "auto"

    def __init__(self) -> None:
        super().__init__()
        self._device = torch.device("cpu")
        self._broken_impls: frozenset = frozenset()  # auto-chosen index builds that failed once, skipped since
        self._graphs: dict = {}  # captured index builds by (device, R, E, capacity)
        self._group_ends_cache: tuple = (None, None)  # (key, int32 group ends) of the last grouped_mm counts

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
            # NCCL: binding the device makes the communicator eager and bound to it (no guessing from the rank)
            bound = {"device_id": self._device} if self._device.type == "cuda" else {}
            dist.init_process_group(
                backend=self.dist_backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                **bound,
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

    # ------------------------------------------------------------------ CUDA fast paths of neutral members
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
            except Exception as e:  # noqa: BLE001 - auto falls back to the next implementation, once, loudly
                if not auto or impl in ("eager", "neutral"):
                    raise
                warnings.warn(f"permute_slots: the {impl} index build failed ({type(e).__name__}: {e}); "
                              "falling back to the next implementation for the rest of this process",
                              RuntimeWarning, stacklevel=2)
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
        fits = (len(counts) == w_EKM.shape[0] and sum(counts) == x_NK.shape[0] and min(counts, default=0) >= 0
                and w_EKM.device == x_NK.device)
        if not (fits and grouped_mm_device_ok(x_NK.device) and grouped_mm_layout_ok(x_NK, w_EKM)):
            return super().grouped_mm(x_NK, w_EKM, counts)  # the reference, which also raises on bad counts
        return self._grouped_mm_fast(x_NK, w_EKM, counts)

    def _grouped_mm_fast(self, x_NK, w_EKM, counts: list[int]):
        """``torch._grouped_mm`` with the counts as int32 group ends on the device. One expert layer calls it three
        times with the same counts, so the ends are copied once."""
        key = (x_NK.device, tuple(counts))
        if self._group_ends_cache[0] != key:
            ends = self.tensor(list(itertools.accumulate(counts)), dtype="int32", device=x_NK.device)
            self._group_ends_cache = (key, ends)
        return torch._grouped_mm(x_NK, w_EKM, offs=self._group_ends_cache[1])

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
        if host_copy_mode(device.type, host.numel() * host.element_size()) == "pinned":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

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

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
