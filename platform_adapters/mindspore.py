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

Its kernels (``MindSporeKernels``): ``grouped_mm`` cuts the rows with one ``split``, as a slice per expert made
MindSpore compile and keep a graph per step (unbounded memory growth). Everywhere, this adapter runs in PyNative mode
only: under ``mindspore.jit`` (any capture mode) or GRAPH_MODE every collective, the autograd primitive, ``tolist``
and ``profile_range`` raise a RuntimeError instead of computing a wrong gradient (see ``_refuse_capture``); on CPU the
autograd primitive refuses bfloat16, which MindSpore cannot compute there after the exchange.

Other workarounds live where they apply: ``send``/``recv`` need the world-group cache seeded, groups are created by
their members only, and ranks come from a TCPStore (no scheduler process) unless msrun started the job.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import shutil
import sys
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
from mindspore.graph import jit_context as _jit_context  # noqa: E402
from mindspore.graph import jit_trace as _jit_trace  # noqa: E402
from mindspore.graph._utils import pijit_context as _pijit_context  # noqa: E402
from mindspore.graph.api import _pynative_executor  # noqa: E402
from mindspore.mint import distributed as dist  # noqa: E402
from mindspore.mint.distributed import distributed as _dist_impl  # noqa: E402
from mindspore.ops.primitive import constexpr  # noqa: E402
from mindspore.profiler.common.record_function import RecordFunction  # noqa: E402

from hyper_parallel.kernels import Kernels  # noqa: E402
from hyper_parallel.platform import DTYPE_NAMES, Group, Platform, Rendezvous, WorldEnv  # noqa: E402

_DEVICE_TYPES = {"CPU": "cpu", "GPU": "gpu", "Ascend": "ascend"}
_BACKENDS = {"cpu": "mccl", "gpu": "nccl", "ascend": "hccl"}

# MindSpore joins one world per process: init after destroy_process_group crashes the process (MindSpore 2.10 on
# CPU: segmentation fault, exit code -11, in the second _init_with_store) or fails its first collective. Module-wide,
# as a second platform object lives in the same process.
_WORLD_DESTROYED = False

# Where MindSpore runs and re-runs a recomputed forward (see MindSporePlatform.recompute_phase).
_RECOMPUTE_FILE = os.path.join("mindspore", "common", "recompute.py")


def _refuse_second_world() -> None:
    """Refuse, with a message, the second world that would crash the process.

    Raises:
        RuntimeError: this process already called ``destroy_process_group()``.
    """
    if _WORLD_DESTROYED:
        raise RuntimeError(
            "init_process_group() after destroy_process_group() is not supported on MindSpore: it allows one "
            "process-group init per process (a second one crashes MindSpore 2.10 with a segmentation fault). Start "
            "each world in a new process (one launch per world), or keep the first world and build new device "
            "meshes on it")


def _copy(x):
    """A new tensor (fresh storage, not a view) holding ``x``'s data, for the in-place collectives to write into.

    ``x * 1``: exact for every number (signed zeros, infinities, subnormals), and it keeps no memory, where
    ``mint.cat`` and ``copy_`` keep about 0.65 KB per call for good on CPU (measured: 16 MiB over 25,600 one-tensor
    concats); an emulated all-to-all copies once per peer plus its own rows. ``clone`` has no CPU kernel and
    ``astype`` to the same dtype aliases. Booleans, which cannot be multiplied, take a one-member concat."""
    if x.dtype != mindspore.bool_:
        return x * 1
    if x.ndim:
        return mint.cat([x])
    out = mint.empty((), dtype=x.dtype)  # not a reshape view: an in-place collective into one is lost
    out.copy_(mint.cat([x.reshape(1)]).reshape(()))
    return out


# ---------------------------------------------------------------------- graph capture: refused, never silently wrong
# Measured on MindSpore 2.10 (CPU, 2 ranks): under jit(capture_mode="bytecode") the custom backward of a _Function is
# traced instead of run, so its Python side effects (the backward all-to-alls) vanish and an expert-parallel step
# returns wrong gradients or crashes the process (segmentation fault); capture_mode="trace" drops the custom backward
# altogether (a wrong gradient even on one device) and aborts the process at its next op after any exception;
# capture_mode="ast" and GRAPH_MODE fail to parse the layers with unrelated messages. Every collective, the autograd
# primitive, the host sync and the profiler range therefore refuse to run unless MindSpore runs the caller eagerly.

_CAPTURES = {
    "ast": "mindspore.jit (capture_mode='ast', the default)",
    "graph": "GRAPH_MODE (mindspore.set_context(mode=mindspore.GRAPH_MODE))",
    "bytecode": "mindspore.jit(capture_mode='bytecode')",
    "trace": "mindspore.jit(capture_mode='trace')",
}


def _capture_error(what: str, capture: str) -> RuntimeError:
    """The refusal of ``what`` under ``capture`` (a key of ``_CAPTURES``): the constraint, what was found, the fix."""
    return RuntimeError(
        f"{what} was reached under {_CAPTURES[capture]}, but hyper_parallel's collectives, autograd primitive and "
        f"host syncs run in MindSpore's PyNative mode only (MindSpore {mindspore.__version__}): graph capture drops "
        "their custom backward (the backward all-to-alls are never issued, so the gradients come out wrong) and "
        "freezes the host-synced split sizes into the graph. Run the model and its gradient eagerly: call them "
        "without mindspore.jit, in mindspore.PYNATIVE_MODE (the default; mindspore.set_context("
        f"mode=mindspore.PYNATIVE_MODE)). Valid: PyNative mode; got: {capture}")


def _pijit_active() -> bool:
    """Whether a ``jit(capture_mode="bytecode")`` call is on the Python stack (its wrapper ``_fn`` runs the function).

    The bytecode capture has no public "am I capturing" flag; its wrapper's frame is there while it runs the
    function, in the code it captures and in the code it hands back to Python (a graph break) alike."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_fn" and code.co_filename == _pijit_context.__file__:
            return True
        frame = frame.f_back
    return False


@constexpr(check=False, reuse_result=False)
def _refuse_graph_compile(probe, what):
    """Raise while MindSpore's graph compiler evaluates the calling code (``jit`` ast/bytecode, GRAPH_MODE).

    A constexpr runs in Python while a graph is compiled, with its arguments' compile-time values: a Python
    function is no constant there and arrives as ``None`` (MindSpore's own ``_run_in_jit`` uses the same test). In
    PyNative it is a plain call with the real function (0.2 us)."""
    if probe is None:
        capture = "bytecode" if _pijit_active() else \
            "graph" if mindspore.get_context("mode") == mindspore.GRAPH_MODE else "ast"
        raise _capture_error(what, capture)


def _abandon_trace(output) -> None:
    """Close the trace a ``jit(capture_mode="trace")`` opened, so that refusing it leaves the process usable.

    MindSpore 2.10's trace wrapper has no ``try``/``finally``: an exception inside the traced function leaves the
    trace open, and the process aborts (SIGABRT) at its next op (measured). This ends the half-built graph and resets
    the wrapper's state as its normal exit does. Best effort: it touches private trace state, so a MindSpore whose
    state differs keeps its own behaviour."""
    try:
        state = _jit_trace._trace_jit_context
        outputs = (output,) if isinstance(output, mindspore.Tensor) else (mindspore.Tensor(0.0),)
        # One source location of our own: MindSpore's _get_caller_lines() fails under `python -m` (a frozen frame
        # has no source line), and the graph is discarded anyway.
        _jit_trace.tr.get_instance().end_graph([__file__], [_abandon_trace.__code__.co_firstlineno],
                                               _jit_trace._DEFAULT_JIT_CONFIG, *outputs)
        _jit_trace._trace_compile_cache.discard(state.phase)  # else the next call "runs" the never-built graph
        state.phase, state.args, state.compiled = "", None, False
        _jit_trace._using_trace = False
        _jit_trace.set_jit_context(None)
    except Exception:  # noqa: BLE001 - the refusal below is what matters; this only tidies up
        pass


# MindSpore 2.10 registers no bfloat16 CPU kernel for Gather (indexing), TensorScatterUpdate (indexed assignment),
# MatMul, Sigmoid, ReduceSum or Softmax (each probed in a fresh process; all of them exist for float16 and float32):
# a bfloat16 token exchange would succeed and the permutation right after it fail with "Select CPU operator[Gather]
# fail! Unsupported data type!", and the experts' products have no kernel either. Refused before the exchange.
_BF16_ON_CPU = (
    "autograd_function (the differentiable collectives behind expert parallelism) got a bfloat16 tensor on backend "
    f"'mindspore', device 'cpu': MindSpore {mindspore.__version__} registers no bfloat16 CPU kernel for the ops that "
    "follow the token exchange (Gather for the token permutation, MatMul for the experts, Sigmoid, ReduceSum, "
    "TensorScatterUpdate, Softmax). Valid dtypes on MindSpore CPU: float32 or float16 (cast the tokens and the "
    "experts' weights, e.g. x.astype(mindspore.float16)); bfloat16 is left to MindSpore's GPU and Ascend kernels")


def _refuse_capture(what: str, tensor=None) -> None:
    """Raise a RuntimeError unless MindSpore runs the calling code eagerly (PyNative mode, no ``jit``).

    Args:
        what: the member reached, for the message.
        tensor: a tensor at hand, used to close a refused trace (see :func:`_abandon_trace`).

    Raises:
        RuntimeError: under ``jit`` (any capture mode) or GRAPH_MODE, naming the mode and what to do instead.
    """
    _refuse_graph_compile(_refuse_capture, what)  # first: a compiler parses only this line before it raises
    _refuse_eager_capture(what, tensor)


def _refuse_eager_capture(what: str, tensor) -> None:
    """The checks of :func:`_refuse_capture` for code that runs as Python (kept apart: a graph compiler parses a
    function's whole body, and cannot parse these)."""
    if _jit_context.jit_context() is not None:  # set only while jit(capture_mode="trace") records
        _abandon_trace(tensor)
        raise _capture_error(what, "trace")
    if _pijit_active():  # code the bytecode capture handed back to Python
        raise _capture_error(what, "bytecode")
    if mindspore.get_context("mode") == mindspore.GRAPH_MODE:  # eager code of a GRAPH_MODE process
        raise _capture_error(what, "graph")


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
        _refuse_capture("the backward of autograd_function", grad)  # a backward captured on its own
        return ctx.backward_fn(grad), None, None


_NUMPY_DTYPES = {"bool": np.bool_, "int32": np.int32, "int64": np.int64, "float16": np.float16,
                 "float32": np.float32, "float64": np.float64}
_HOST_SOURCES = ("bool", "int32", "int64")


class MindSporeKernels(Kernels):
    """The MindSpore adapter's kernels: ``grouped_mm`` cuts the rows with one ``split`` instead of a slice per expert.

    Why: MindSpore 2.10 compiles and keeps a kernel graph for every new (shape, start, stop) of a slice's gradient
    (``StridedSliceGrad``, which has no cached fast path on CPU), and per-expert row counts change every step, so the
    reference's ``x[start:start + n]`` made a training process grow without bound: an expert-parallel MoE training
    loop on 2 ranks grew 0.77 MiB per step per rank, the single-process demo 3.5 MiB per step (measured: Python's heap
    stayed flat; the growth went away with constant routing or with ``mindspore.ms_memory_recycle()``). A ``split``
    (its gradient a concat) compiles nothing per shape: 0.11 MiB per step, and the step is about 20% faster.

    Not batched: one ``bmm`` over the experts padded to the busiest one's rows (the rows gathered into ``[E, C, K]``
    through host-built indices, the real rows gathered back) made the experts' forward and backward 2x faster, but
    the 200-step soak's memory growth on MindSpore went from 0.22-0.25 to 0.48-0.54 MiB per step per process, even
    with ``C`` rounded to four sizes per octave (measured 2026-11-30); so the loop stays.
    """

    #: Bookkeeping (expert counts, sort orders, casts of indices and masks) through NumPy, for tensors in host
    #: memory (the platform sets it on CPU): a MindSpore cast or comparison-sum costs 0.4-0.6 ms there, the NumPy
    #: forms 0.01-0.03 ms (measured at the demo's sizes, 2026-12-01). Values equal the references'.
    host_ints: bool = False

    def expert_counts(self, ids, num_experts: int):
        if not self.host_ints:
            return super().expert_counts(ids, num_experts)
        ids_N = ids.asnumpy().reshape(-1)
        # ids outside [0, E) count nowhere, as in the reference's comparison (bincount would fail or grow)
        ids_N = ids_N[(ids_N >= 0) & (ids_N < num_experts)]
        return mindspore.Tensor.from_numpy(np.bincount(ids_N, minlength=num_experts).astype(np.int64))

    def stable_order(self, ids_N):
        if not self.host_ints:
            return super().stable_order(ids_N)
        return mindspore.Tensor.from_numpy(np.argsort(ids_N.asnumpy(), kind="stable").astype(np.int64))

    def convert(self, x, dtype: str):
        source = self.platform.dtype_name(x.dtype)
        # from integers and booleans only: they carry no gradient, whatever the caller says
        if not self.host_ints or dtype not in _NUMPY_DTYPES or source == dtype or source not in _HOST_SOURCES:
            return super().convert(x, dtype)
        return mindspore.Tensor.from_numpy(x.asnumpy().astype(_NUMPY_DTYPES[dtype]))

    def matmul(self, a_NK, b_KM):
        return mint.bmm(a_NK.unsqueeze(0), b_KM.unsqueeze(0)).squeeze(0)

    def gate_up(self, x_ND, w1_EHD, w3_EHD, num_tokens_per_expert: Sequence[int]):
        # one grouped_mm on [E, D, 2H] (w1 and w3 side by side) and one split: about half the ops of two
        H = w1_EHD.shape[1]
        if tuple(w3_EHD.shape) != tuple(w1_EHD.shape) or len(w1_EHD.shape) != 3:
            return super().gate_up(x_ND, w1_EHD, w3_EHD, num_tokens_per_expert)
        h_NH, g_NH = mint.split(self.grouped_mm(x_ND, mint.cat([w1_EHD, w3_EHD], dim=1).mT, num_tokens_per_expert),
                                H, dim=1)
        return h_NH, g_NH

    def grouped_mm(self, x_NK, w_EKM, num_tokens_per_expert: Sequence[int]):
        counts = [int(n) for n in num_tokens_per_expert]
        live = [e for e, n in enumerate(counts) if n]  # empty experts are skipped, as in the reference
        if (len(counts) != w_EKM.shape[0] or sum(counts) != x_NK.shape[0] or (counts and min(counts) < 0)
                or not live):
            return super().grouped_mm(x_NK, w_EKM, counts)  # raises on bad counts; zero rows: its connected zeros
        # in bmm's 3-D form from the start: one split of each operand into [1, n, K] and [1, K, M] pieces, one cat
        # and one squeeze, instead of an unsqueeze of both operands and a squeeze per expert (3 ops of ~0.06 ms each)
        w_E = mint.split(w_EKM, 1)
        x_1NK = x_NK.unsqueeze(0)
        parts = mint.split(x_1NK, [counts[e] for e in live], dim=1) if len(live) > 1 else (x_1NK,)
        outs = [mint.bmm(part, w_E[e]) for part, e in zip(parts, live)]
        return (outs[0] if len(outs) == 1 else mint.cat(outs, dim=1)).squeeze(0)


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
        self._rendezvous: Rendezvous | None = None  # with the store: how the ranks line up to leave
        self._groups: set[str] = set()
        self.kernels = MindSporeKernels(self)
        # the index build from the host counts: two tensors instead of ~10 ops (repeat_interleave alone ~30 ms)
        self.kernels.host_index_build = self.kernels.host_ints = self._target == "CPU"

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
        _refuse_second_world()  # before msrun's management.init() below, which would crash too
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
        _refuse_second_world()
        if not management.GlobalComm.INITED:
            self._select_device(env.local_rank)
            # mccl's collectives wait MS_CPU_COMM_OP_TIMEOUT seconds (default 30, whatever the init timeout says;
            # measured: an all_reduce missing a peer fails after exactly that long), read when the world starts. A
            # value the user set for MindSpore itself wins.
            os.environ.setdefault("MS_CPU_COMM_OP_TIMEOUT", str(max(1, math.ceil(timeout_s))))
            if "MS_ROLE" in os.environ:
                management.init()  # a scheduler process (msrun, or its env set by hand) runs the rendezvous
            else:
                # torchrun-style env: a TCPStore hosted by rank 0 replaces msrun's scheduler process. Kept on self:
                # rank 0 serves the store for the life of the job.
                rendezvous = Rendezvous(env, timeout_s)
                self._store = self._rendezvous_store(rendezvous)
                management._init_with_store(backend=self.dist_backend, timeout=datetime.timedelta(seconds=timeout_s),
                                            world_size=env.world_size, rank=env.rank, store=self._store)
                # The barrier below is a collective, bounded by MS_CPU_COMM_OP_TIMEOUT; the init above takes longer
                # on rank 0 (seen: > 3 s apart on a loaded machine), so the ranks line up on the store first.
                rendezvous.barrier(self._store, "initialized")
                self._rendezvous = rendezvous
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

    @staticmethod
    def _rendezvous_store(rendezvous: Rendezvous) -> Any:
        """Open the world's TCPStore after the start-up checks, and wait until every rank has joined it."""
        env = rendezvous.env
        if rendezvous.is_master:
            # The store binds MASTER_ADDR itself (measured: 127.0.0.1 in /proc/net/tcp for a local launch, so it
            # stays on loopback) but reports a busy port only as "Failed to initialize the master node": check first.
            rendezvous.check_port(rendezvous.address)
        else:
            rendezvous.wait_for_master()
        # host_name: the resolved address, as the store accepts IP addresses only. wait_for_workers=False: rank 0
        # would otherwise wait in the constructor, silently, for the whole timeout if a rank never comes;
        # Rendezvous.join waits instead, for the start-up timeout, and says who is missing.
        store = rendezvous.open_store(lambda: dist.TCPStore(
            rendezvous.address, env.master_port, env.world_size, rendezvous.is_master,
            datetime.timedelta(seconds=rendezvous.timeout_s), wait_for_workers=False))
        rendezvous.join(store)
        return store

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
        global _WORLD_DESTROYED
        # Set first: even a destroy that fails half-way leaves a process that must not init again.
        _WORLD_DESTROYED = True
        if self._rendezvous is not None:
            # Not a collective: mccl's last sender may still wait for an acknowledgement that a peer tearing down at
            # once never sends (seen: 2 runs in 6 of a 4-rank example hung in this barrier's all_reduce until the
            # collective timeout, the other ranks gone).
            self._rendezvous.leave(self._store)
        else:  # msrun: no store of ours
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
        _refuse_capture("all_reduce", x)
        out = _copy(x)
        if out.size:  # every member holds the same shape, so all of them skip an empty reduction together
            dist.all_reduce(out, op, group.native)
        return out

    def _all_gather_into_tensor(self, x, group: Group):
        _refuse_capture("all_gather_into_tensor", x)
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
        _refuse_capture("reduce_scatter_tensor", x)
        rows = x.shape[0] // group.size
        if self._native_kernels and x.size:
            out = mint.empty((rows, *x.shape[1:]), dtype=x.dtype)
            dist.reduce_scatter_tensor(out, x, op, group.native)
            return out
        start = group.ranks.index(self._rank) * rows
        # Copy the slice: a view would keep the whole reduced tensor alive.
        return _copy(self._all_reduce(x, op, group)[start:start + rows])

    def _all_to_all_single(self, x, output_shape, input_splits, output_splits, group: Group, async_op: bool):
        _refuse_capture("all_to_all_single", x)
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
        _refuse_capture("broadcast", x)
        out = _copy(x)
        if out.size:
            dist.broadcast(out, src, group.native)
        return out

    # ------------------------------------------------------------------ autograd
    def autograd_function(self, forward: Callable, backward: Callable) -> Callable:
        def op(x):
            # Both checks run before anything is sent, on every rank alike: no rank is left waiting in a collective.
            _refuse_capture("autograd_function", x)
            if x.dtype == mindspore.bfloat16 and self._target == "CPU":
                raise TypeError(_BF16_ON_CPU)
            return _ClosureFunction.apply(x, forward, backward)

        return op

    def value_and_grad(self, fn: Callable, inputs: Sequence, params: Sequence = ()) -> tuple:
        inputs, params = tuple(inputs), list(params)
        if not inputs and not params:
            return fn(), (), ()
        try:
            value, grads = mindspore.value_and_grad(
                fn, grad_position=tuple(range(len(inputs))) if inputs else None, weights=params or None
            )(*inputs)
        except BaseException:
            # MindSpore 2.10 keeps the half-built autograd state of a function that raised, and later steps with
            # its optimizers then silently take other values (measured: nn.AdamWeightDecay's second step on).
            # Clearing the executor's resources restores it; the error goes on to the caller.
            _pynative_executor.clear_res()
            raise
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
        # on CPU from NumPy (host memory): 0.16 ms as an op, 0.01 ms this way
        if self._target == "CPU" and dtype in _NUMPY_DTYPES and dtype != "bool":
            return mindspore.Tensor.from_numpy(np.arange(end, dtype=_NUMPY_DTYPES[dtype]))
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
        _refuse_capture("tolist (the host sync)", x)  # a captured host sync is a constant of the graph
        # numpy has no bfloat16: asnumpy() refuses it, float32 holds every bfloat16 value exactly.
        if x.dtype == mindspore.bfloat16:
            x = x.astype(mindspore.float32)
        return x.asnumpy().tolist()

    def _to_numpy(self, x):
        _refuse_capture("to_numpy (a host sync)", x)
        if x.dtype == mindspore.bfloat16:  # NumPy has no bfloat16; float32 holds each value exactly
            x = x.astype(mindspore.float32)
        return x.asnumpy()

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

    def _assign(self, param, value) -> None:
        if value.dtype != param.dtype:
            value = value.astype(param.dtype)
        # set_data keeps the Parameter object (an optimizer's reference stays valid); a fresh copy, so the
        # parameter never aliases the caller's tensor
        param.set_data(_copy(value))

    def recompute_phase(self) -> str | None:
        # MindSpore runs a recomputed Cell's first forward from the recompute cell's construct, without autograd,
        # and re-runs it from that cell's custom bprop (Cell.recompute(), mindspore.recompute with
        # use_reentrant=True) or from recompute_function (use_reentrant=False). It exposes no flag to read, so look
        # for those frames on the stack (microseconds; a forward costs milliseconds).
        frame, phase = sys._getframe(1), None
        while frame is not None:
            code = frame.f_code
            if code.co_filename.endswith(_RECOMPUTE_FILE):
                if code.co_name in ("bprop", "recompute_function"):
                    return "again"  # (the re-run also passes through the recompute cell's construct: look on)
                if code.co_name == "construct":
                    phase = "first"
            frame = frame.f_back
        return phase

    def manual_seed(self, seed: int) -> None:
        mindspore.set_seed(seed)
        np.random.seed(seed)

    def profile_range(self, name: str):
        # Every layer opens its ranges first: a captured layer is refused here, before any of its work is traced.
        _refuse_capture(name)
        # MindSpore's host-side range (what mindspore.profiler.Profiler records around Python code); its public
        # export is missing in 2.10, the class lives in profiler.common.
        return RecordFunction(name)
