"""The platform contract: everything the neutral core needs that differs between frameworks.

A member joins the contract only when neutral code needs it AND the frameworks spell it differently. What they
spell the same way (``x.view``, ``x[idx]``, ``x.shape``, ``x.repeat_interleave(t)``, ...) is used directly (the
shared tensor API, :mod:`hyper_parallel.tensor_api`).

The contract comes in three groups:

1. **What an adapter MUST provide**: :class:`Platform`, this module. Identity, process groups, collectives, the
   autograd primitive, tensor factories, module access and instrumentation. Its members are either abstract (each
   adapter implements them) or *checked templates* written here once (the collectives, ``tolist``): they validate
   the arguments on the host, count the call for :meth:`Platform.count_calls`, and hand over to an adapter's
   ``_``-prefixed implementation, so the checks hold identically on every backend.
2. **What an adapter MAY replace with a faster kernel**: :class:`~hyper_parallel.kernels.Kernels`, reached as
   ``platform.kernels``. Every member has a neutral reference.
3. **What is written once on top**: the differentiable collectives, plain functions in
   :mod:`hyper_parallel.functional`. No adapter touches them.

The backend is resolved once per process by :func:`~hyper_parallel.get_platform`.

>>> from hyper_parallel import get_platform
>>> p = get_platform()            # doctest: +SKIP
>>> p.init_process_group()        # reads RANK, WORLD_SIZE, MASTER_ADDR, ...  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hyper_parallel import _validation as check
from hyper_parallel import collective_checks
from hyper_parallel._select import get_platform
from hyper_parallel.kernels import Kernels
from hyper_parallel.rendezvous import (  # noqa: F401 - part of this module's API since the adapters import it here
    DEFAULT_START_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    START_TIMEOUT_ENV_VAR,
    TIMEOUT_ENV_VAR,
    Rendezvous,
    WorldEnv,
    process_group_timeout,
    start_timeout,
)

_log = logging.getLogger(__name__)

__all__ = ["CallCounts", "Group", "Handle", "Platform", "Rendezvous", "WorldEnv", "DTYPE_NAMES",
           "TIMEOUT_ENV_VAR", "START_TIMEOUT_ENV_VAR", "process_group_timeout", "start_timeout"]

#: Neutral dtype names accepted by the factories and reported by :meth:`Platform.dtype_name`.
DTYPE_NAMES = ("bool", "int32", "int64", "float16", "bfloat16", "float32", "float64")
_ITEMSIZE = {"bool": 1, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


class CallCounts(collections.Counter):
    """What :meth:`Platform.count_calls` saw: calls by name (the counter itself) and, in :attr:`bytes`, the
    payload bytes by collective name.

    The payload is what this rank hands to the collective: its input tensor, except for ``all_to_all_single``,
    where only the rows sent to OTHER members count (its own rows never leave the process).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """A process group as every rank sees it.

    Every rank holds a ``Group`` for every group created, members or not, so neutral code never branches on
    membership. ``native`` is the framework's handle (a torch ``ProcessGroup``, a MindSpore group name); it is
    ``None`` on ranks outside the group.
    """

    ranks: tuple[int, ...]
    """Global ranks of the members, in group-rank order."""
    native: Any = None
    """The framework's handle for this group, or ``None`` on a non-member."""
    _left: bool = dataclasses.field(default=False, init=False, repr=False)
    """Set when this process left the group's world (``destroy_process_group``): the handle is dropped then."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __repr__(self) -> str:
        return f"Group(ranks={list(self.ranks)})"

    def __reduce__(self):
        # A process group is a live resource of this process, not data: pickling (and deepcopy) keep its ranks,
        # and loading finds this process's group over the same ranks (see Platform.new_group).
        return _group_by_ranks, (self.ranks,)


def _group_by_ranks(ranks: tuple[int, ...]) -> Group:
    return get_platform()._existing_group(tuple(ranks))


class Handle:
    """The completion handle of an asynchronous collective. ``wait()`` blocks until the output may be read."""

    def __init__(self, wait: Callable[[], None] | None = None):
        self._wait = wait

    def wait(self) -> None:
        if self._wait is not None:
            self._wait()
            self._wait = None

    def is_completed(self) -> bool:
        """True once :meth:`wait` has run (a synchronous collective's handle is born completed)."""
        return self._wait is None


class Platform(abc.ABC):
    """What a framework must provide to run the neutral core. One subclass per framework in ``platform_adapters``.

    Collectives are out of place: they return a new tensor and never modify their input.
    ``group=None`` always means the world group.
    """

    #: Dtype names this backend's collectives can carry; adapters narrow it.
    collective_dtypes: tuple[str, ...] = ("int32", "int64", "float16", "bfloat16", "float32", "float64")

    kernels: Kernels
    """The kernels this backend runs (group 2 of the contract): the neutral references unless the adapter sets a
    :class:`~hyper_parallel.kernels.Kernels` subclass of its own in ``__init__``."""

    def __init__(self) -> None:
        self._world: Group | None = None
        self._rank: int | None = None
        self._counters: list[CallCounts] = []
        self._groups_by_ranks: dict[tuple[int, ...], Group] = {}
        self.kernels = Kernels(self)

    # ------------------------------------------------------------------ identity
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The backend's name as ``HYPER_PARALLEL_PLATFORM`` spells it (``"torch"``, ``"mindspore"``, ...)."""

    @property
    @abc.abstractmethod
    def device_type(self) -> str:
        """Device kind the tensors of this process live on: ``"cpu"``, ``"cuda"``, ``"npu"``, ``"Ascend"``..."""

    @property
    @abc.abstractmethod
    def dist_backend(self) -> str:
        """The collective library in use: ``"gloo"``, ``"nccl"``, ``"hccl"``, ``"mccl"``."""

    @property
    @abc.abstractmethod
    def Tensor(self) -> type:
        """The framework's tensor class (for ``isinstance`` checks in neutral code)."""

    @property
    @abc.abstractmethod
    def Parameter(self) -> type:
        """The framework's trainable-parameter class."""

    @property
    @abc.abstractmethod
    def Module(self) -> type:
        """The framework's layer base class (``torch.nn.Module``, ``mindspore.nn.Cell``)."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Version strings of the framework and its device/collective extensions, for diagnostics."""

    # ------------------------------------------------------------------ process groups
    def init_process_group(self, timeout_s: float | None = None) -> Group:
        """Join the world described by the launcher environment (see :class:`WorldEnv`) and return the world group.

        Works under ``python -m hyper_parallel.launch``, torchrun, and (MindSpore) msrun. Calling it again in an
        initialised process returns the world group unchanged.

        Start-up is checked (see :class:`Rendezvous`): a world started wrongly (ranks disagreeing on WORLD_SIZE, a
        busy MASTER_PORT, a rank that never comes) fails within ``HYPER_PARALLEL_START_TIMEOUT`` seconds (default
        60, at most ``timeout_s``) with a message naming the setting, rather than waiting out ``timeout_s``.

        Args:
            timeout_s: seconds any collective, and the framework's own rendezvous, may wait for the other ranks
                before failing with an error instead of hanging. Default: ``HYPER_PARALLEL_TIMEOUT``, else 300.

        Raises:
            ValueError: the launcher environment is missing or malformed, MASTER_ADDR does not resolve, ranks
                disagree on WORLD_SIZE or share a RANK, or a timeout (``timeout_s``, ``HYPER_PARALLEL_TIMEOUT``,
                ``HYPER_PARALLEL_START_TIMEOUT``) is not a positive, finite number of seconds.
            RuntimeError: rank 0 cannot bind MASTER_PORT, the store cannot be reached, or not every rank joined
                within the start-up timeout (each message says what to check); on MindSpore, a second init in a
                process that called :meth:`destroy_process_group`.
        """
        # Checked on every call, before anything starts: a bad setting fails the same way on every rank.
        timeout_s = process_group_timeout(timeout_s)
        start_timeout(timeout_s)
        if self._world is None:
            env = self._read_world_env()
            native = self._init_process_group(env, timeout_s)
            self._rank = env.rank
            self._world = Group(ranks=tuple(range(env.world_size)), native=native)
            self._groups_by_ranks = {self._world.ranks: self._world}
            _log.info("joined the world as rank %d of %d: %s on %s, collectives via %s, timeout %g s", env.rank,
                      env.world_size, self.name, self.device_type, self.dist_backend, timeout_s)
        return self._world

    def _read_world_env(self) -> WorldEnv:
        return WorldEnv.from_environ()

    def is_initialized(self) -> bool:
        """Whether :meth:`init_process_group` has run in this process."""
        return self._world is not None

    def get_rank(self) -> int:
        """Global rank of this process."""
        self._require_world("get_rank")
        return self._rank

    def get_world_size(self) -> int:
        """Number of processes in the world."""
        return self._require_world("get_world_size").size

    def new_group(self, ranks: Sequence[int]) -> Group:
        """Create a process group of ``ranks``. EVERY rank of the world calls it, with the same arguments, in the
        same order (the torch habit); frameworks that want members-only creation get it inside the adapter.

        A group is created once per process: asking again for the same ranks returns the same ``Group`` without
        any collective (so meshes built twice share groups, and an unpickled model finds its groups again).

        Raises:
            ValueError: if ``ranks`` is empty, has duplicates, or names a rank outside the world.
        """
        world = self._require_world("new_group")
        ranks = tuple(int(r) for r in ranks)
        if not ranks or len(set(ranks)) != len(ranks) or not set(ranks) <= set(world.ranks):
            raise ValueError(
                f"new_group: ranks must be a non-empty list of distinct world ranks in [0, {world.size}), got "
                f"{list(ranks)}"
            )
        if ranks not in self._groups_by_ranks:
            native = self._new_group(ranks, member=self._rank in ranks)
            self._groups_by_ranks[ranks] = Group(ranks=ranks, native=native if self._rank in ranks else None)
            _log.debug("created the group over ranks %s%s", list(ranks),
                       "" if self._rank in ranks else " (not a member)")
        return self._groups_by_ranks[ranks]

    def group_rank(self, group: Group | None = None) -> int:
        """This process's rank inside ``group``.

        Raises:
            ValueError: if this process is not a member.
        """
        group = self._group(group, "group_rank")
        return group.ranks.index(self._rank)

    def group_size(self, group: Group | None = None) -> int:
        """Number of members of ``group``."""
        return self._require_world("group_size").size if group is None else group.size

    def group_ranks(self, group: Group | None = None) -> list[int]:
        """Global ranks of the members of ``group``, in group-rank order."""
        return list((self._require_world("group_ranks") if group is None else group).ranks)

    def destroy_process_group(self) -> None:
        """Leave the world, forgetting its groups (meshes built on them are unusable afterwards). torch can join a
        new world in the same process afterwards; MindSpore cannot (:meth:`init_process_group` then raises)."""
        if self._world is not None:
            self._destroy_process_group()
            # Let go of the native handles now, while Python is fully alive: a torch gloo group that a mesh or a
            # variable keeps until the interpreter shuts down is torn down during finalization, and its worker
            # threads releasing their last work then abort the process ("terminate called without an active
            # exception", SIGABRT after the work was done: seen in about one run in four of a script ending with
            # a dispatch and destroy_process_group on 2 ranks). A Group of the old world refuses to be used.
            for group in {self._world, *self._groups_by_ranks.values()}:  # eq=False: a set of the objects
                object.__setattr__(group, "native", None)
                object.__setattr__(group, "_left", True)
            self._world = None
            self._rank = None
            self._groups_by_ranks = {}

    def barrier(self, group: Group | None = None) -> None:
        """Block until every member of ``group`` has reached the barrier (a real block on every backend)."""
        group = self._group(group, "barrier")
        self._record("barrier")
        self._barrier(group)

    # ------------------------------------------------------------------ collectives on plain tensors
    def all_reduce(self, x, op: str = "sum", group: Group | None = None):
        """Element-wise reduction of ``x`` over ``group``; ``op`` is ``"sum"``, ``"max"`` or ``"avg"``.

        ``avg`` needs a floating dtype. Returns a new tensor; ``x`` is unchanged.
        """
        op = check.check_reduce_op(op)
        group = self._collective_prologue("all_reduce", x, group, op=op)
        if op == "avg" and not self.dtype_name(x.dtype).startswith(("float", "bfloat")):
            raise TypeError(f"all_reduce: op 'avg' needs a floating dtype, got {self.dtype_name(x.dtype)}")
        return self._all_reduce(x, op, group)

    def all_gather_into_tensor(self, x, group: Group | None = None):
        """Concatenate every member's ``x`` along dim 0, in group-rank order. All inputs must share one shape."""
        group = self._collective_prologue("all_gather_into_tensor", x, group)
        return self._all_gather_into_tensor(x, group)

    def reduce_scatter_tensor(self, x, op: str = "sum", group: Group | None = None):
        """Reduce ``x`` over ``group`` and return this member's slice of dim 0 (``x.shape[0] / group size`` rows).

        Raises:
            ValueError: if dim 0 of ``x`` is not divisible by the group size.
        """
        op = check.check_reduce_op(op)
        group = self._collective_prologue("reduce_scatter_tensor", x, group, op=op)
        if x.shape[0] % group.size:
            raise ValueError(
                f"reduce_scatter_tensor: dim 0 ({x.shape[0]}) must be divisible by the group size ({group.size})"
            )
        return self._reduce_scatter_tensor(x, op, group)

    def all_to_all_single(self, x, *, output_split_sizes: Sequence[int] | None = None,
                          input_split_sizes: Sequence[int] | None = None, output_shape: Sequence[int] | None = None,
                          group: Group | None = None, async_op: bool = False):
        """Exchange rows: ``x[input offsets of j]`` goes to member ``j``; rows from member ``i`` land at
        ``output offsets of i``. Split sizes may be uneven and may be zero.

        Every argument after ``x`` is keyword-only: the two split lists are easy to swap, and frameworks disagree on
        their order (this one names them as ``torch.distributed.all_to_all_single`` does).

        Args:
            x: tensor whose dim 0 is split by ``input_split_sizes``.
            output_split_sizes: rows received from each member (Python ints); ``None`` = even split of the output.
            input_split_sizes: rows sent to each member (Python ints); ``None`` = even split of ``x``.
            output_shape: shape of the result; defaults to ``x.shape`` with dim 0 = ``sum(output_split_sizes)``.
            group: the group to exchange in (``None`` = world).
            async_op: if True, return before completion; call ``handle.wait()`` before reading the output.

        Returns:
            ``(output, handle)``; ``handle.wait()`` is a no-op for a synchronous call.

        Raises:
            ValueError: split sizes negative, of the wrong length, or not summing to the rows.
        """
        group = self._group(group, "all_to_all_single")
        self._check_tensor("all_to_all_single", x)
        n = group.size
        in_splits = check.check_splits(input_split_sizes, int(x.shape[0]), n, "input_split_sizes", "x.shape[0]")
        if output_shape is None:
            if output_split_sizes is None:
                output_shape = tuple(x.shape)
            else:
                output_shape = (sum(int(s) for s in output_split_sizes), *x.shape[1:])
        output_shape = check.check_output_shape(output_shape, tuple(x.shape))
        out_splits = check.check_splits(output_split_sizes, output_shape[0], n, "output_split_sizes",
                                        "output_shape[0]")
        # bytes leaving this rank: the rows for every other member
        me = group.ranks.index(self._rank)
        if collective_checks.enabled():
            collective_checks.check_agreement(self, "all_to_all_single", x, group, input_splits=in_splits,
                                              output_splits=out_splits)
        self._record("all_to_all_single", self._nbytes(x, rows=sum(in_splits) - in_splits[me]))
        out, wait = self._all_to_all_single(x, output_shape, in_splits, out_splits, group, async_op)
        handle = Handle(wait)
        if not async_op:
            handle.wait()
        return out, handle

    def broadcast(self, x, src: int = 0, group: Group | None = None):
        """Return ``src``'s ``x`` on every member (``src`` is a GLOBAL rank, as in torch)."""
        group = self._collective_prologue("broadcast", x, group, src=src)
        if src not in group.ranks:
            raise ValueError(f"broadcast: src rank {src} is not a member of the group with ranks {list(group.ranks)}")
        return self._broadcast(x, src, group)

    # ------------------------------------------------------------------ autograd
    @abc.abstractmethod
    def autograd_function(self, forward: Callable, backward: Callable) -> Callable:
        """THE autograd primitive: build ``op(x)`` computing ``forward(x)`` whose gradient is ``backward(dy)``.

        One tensor in, one tensor out; static arguments are bound in the closures. Every differentiable
        collective is written once on top of it.

        >>> double = p.autograd_function(lambda x: x * 2, lambda g: g * 2)   # doctest: +SKIP
        """

    @abc.abstractmethod
    def value_and_grad(self, fn: Callable, inputs: Sequence, params: Sequence = ()) -> tuple:
        """Evaluate ``fn(*inputs)`` (a scalar) and its gradients.

        Returns:
            ``(value, input_grads, param_grads)``: the grads are tuples matching ``inputs`` and ``params``.
        """

    # ------------------------------------------------------------------ tensor factories and host transfer
    @abc.abstractmethod
    def dtype(self, name: str):
        """The native dtype for a neutral name in :data:`DTYPE_NAMES`.

        Raises:
            ValueError: for an unknown name (the message lists the valid names).
        """

    @abc.abstractmethod
    def dtype_name(self, dtype) -> str:
        """The neutral name of a native dtype (inverse of :meth:`dtype`)."""

    @abc.abstractmethod
    def arange(self, end: int, *, dtype: str = "int64", device=None):
        """``[0, 1, ..., end-1]`` on ``device`` (default: this process's device)."""

    @abc.abstractmethod
    def zeros(self, shape: Sequence[int], *, dtype: str = "float32", device=None):
        """A zero-filled tensor (zero-size shapes allowed)."""

    @abc.abstractmethod
    def empty(self, shape: Sequence[int], *, dtype: str = "float32", device=None):
        """An uninitialised tensor (zero-size shapes allowed)."""

    @abc.abstractmethod
    def cat(self, tensors: Sequence, dim: int = 0):
        """Concatenate along ``dim``; empty members are allowed. Differentiable."""

    @abc.abstractmethod
    def tensor(self, data: Sequence, *, dtype: str = "float32", device=None):
        """A tensor built from a (nested) Python list or a NumPy array, on ``device`` (default: this process's
        device)."""

    def tolist(self, x) -> list:
        """Copy ``x`` to the host as a (nested) Python list. This is the ONE device-to-host sync the neutral core
        uses on its training path; it is counted as ``"host_sync"`` by :meth:`count_calls`."""
        self._record("host_sync")
        return self._tolist(x)

    def to_numpy(self, x):
        """Copy ``x`` to the host as a NumPy array of its shape, for bulk data (checkpoints): bfloat16, which NumPy
        lacks, comes back as float32 (which holds every bfloat16 value exactly). The array may share memory with a
        host tensor: copy it before ``x`` changes if you keep it. Counted as ``"host_sync"``."""
        self._record("host_sync")
        return self._to_numpy(x)

    # ------------------------------------------------------------------ modules
    @abc.abstractmethod
    def named_modules(self, module) -> list:
        """``[(qualified_name, submodule), ...]`` depth-first, the root first with name ``""``."""

    @abc.abstractmethod
    def named_parameters(self, module) -> list:
        """``[(qualified_name, parameter), ...]`` of ``module`` and its submodules (``"sub.weight"``)."""

    @abc.abstractmethod
    def replace_parameter(self, module, name: str, tensor):
        """Make ``module.<name>`` a new Parameter holding ``tensor`` (keeping ``requires_grad``); return it.

        This is how a parameter comes to hold its local shard."""

    def assign(self, param, value) -> None:
        """Overwrite the values of ``param`` (a Parameter) in place with ``value`` (same shape; cast to
        ``param``'s dtype), keeping the object, so optimizers and hooks holding it see the new values. Not
        differentiable: for module state and checkpoint loads.

        Raises:
            ValueError: the shapes differ.
        """
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"assign: the value's shape {list(value.shape)} differs from the parameter's "
                             f"{list(param.shape)}")
        self._assign(param, value)

    def register_forward_pre_hook(self, module, hook: Callable):
        """Call ``hook(module, args)`` before ``module``'s forward; a non-None result replaces ``args`` (a tuple).
        Returns a handle with ``remove()``.

        torch ``nn.Module`` and MindSpore 2.10 ``nn.Cell`` spell this, and the next member, the same way with the
        same semantics (checked by the conformance suite), so this default serves both; an adapter whose framework
        differs overrides it."""
        return module.register_forward_pre_hook(hook)

    def register_forward_hook(self, module, hook: Callable):
        """Call ``hook(module, args, output)`` after forward; a non-None result replaces the output.
        Returns a handle with ``remove()``."""
        return module.register_forward_hook(hook)

    def register_sharded_state_dict(self, module) -> None:
        """Make the framework's checkpointing see ``module``'s sharded parameters with their layout (called by
        :func:`~hyper_parallel.dtensor.module.distribute_parameter` each time it records one; must be idempotent).

        The default does nothing: the module's state dict holds the local shards. The torch adapter makes
        ``state_dict`` return torch ``DTensor`` values (:mod:`hyper_parallel.integrations.torch_dcp`), because
        ``torch.distributed.checkpoint`` takes a plain tensor for a replicated one and restores one rank's shard
        everywhere."""
        return None  # explicit: a deliberate no-op default, not a forgotten abstract method

    def recompute_phase(self) -> str | None:
        """Where the running forward stands in activation checkpointing (torch ``checkpoint``, MindSpore
        ``Cell.recompute()``): ``None`` for a plain forward; ``"first"`` for the first run of a forward that will be
        recomputed, when the framework runs it without autograd (MindSpore: tensors made there get no gradient);
        ``"again"`` for the re-run inside backward. The MoE layer skips its side effects (load counts,
        load-balancing loss entries, routing statistics) in ``"again"``, so they happen once per real step. The
        default: always ``None``."""
        return None

    def register_gradient_reducer(self, module, reducer) -> None:
        """Run ``reducer`` (a :class:`~hyper_parallel.parallel.data_parallel.GradientReducer`) on ``module``'s
        gradients during every backward, where the framework stores gradients on the parameters (called once by
        :class:`~hyper_parallel.parallel.data_parallel.DataParallel`).

        The default does nothing: the caller reduces the gradients the framework returns with
        :func:`~hyper_parallel.parallel.data_parallel.reduce_gradients` (MindSpore). The torch adapter all-reduces
        each bucket as its gradients become ready, overlapped with the rest of backward
        (:mod:`hyper_parallel.integrations.torch_data_parallel`)."""
        return None  # explicit: a deliberate no-op default, not a forgotten abstract method

    @abc.abstractmethod
    def manual_seed(self, seed: int) -> None:
        """Seed the framework's global random generator(s)."""

    # ------------------------------------------------------------------ instrumentation
    @contextlib.contextmanager
    def count_calls(self) -> Iterator[CallCounts]:
        """Count the collectives (by name), the bytes they moved, and the host syncs (``"host_sync"``) issued inside
        the block. Blocks nest; each sees every call made while it is open.

        >>> with p.count_calls() as calls:                         # doctest: +SKIP
        ...     y = p.all_reduce(x)
        >>> calls["all_reduce"], calls.bytes["all_reduce"]         # doctest: +SKIP
        (1, 4096)
        """
        counter = CallCounts()
        self._counters.append(counter)
        try:
            yield counter
        finally:
            self._counters.remove(counter)

    def profile_range(self, name: str) -> contextlib.AbstractContextManager:
        """A named range in the framework's profiler trace around the block (``torch.profiler.record_function`` on
        torch). The default is a no-op; adapters whose framework has such ranges override it."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ adapter hooks (not public)
    def _record(self, what: str, nbytes: int = 0) -> None:
        for c in self._counters:
            c[what] += 1
            c.bytes[what] += nbytes

    def _nbytes(self, x, rows: int | None = None) -> int:
        """Bytes of ``x``, or of ``rows`` of its dim-0 rows."""
        row = _ITEMSIZE[self.dtype_name(x.dtype)]
        for d in tuple(x.shape)[1:]:
            row *= int(d)
        return row * (int(x.shape[0]) if x.shape else 1) if rows is None else row * rows

    def _existing_group(self, ranks: tuple[int, ...]) -> Group:
        """The group over ``ranks`` this process already created (what an unpickled object refers to).

        Raises:
            RuntimeError: no world yet, or no such group in this process.
        """
        self._require_world("loading a pickled process group")
        if ranks not in self._groups_by_ranks:
            raise RuntimeError(
                f"the object being loaded refers to a process group over ranks {list(ranks)}, which this process has "
                f"not created (it has groups over {sorted(list(r) for r in self._groups_by_ranks)}). Build the same "
                "device mesh first (init_device_mesh with the same shape), then load; or save unparallelized weights")
        return self._groups_by_ranks[ranks]

    def _require_world(self, what: str) -> Group:
        if self._world is None:
            raise RuntimeError(
                f"{what}() called before init_process_group(); call "
                "hyper_parallel.get_platform().init_process_group() first"
            )
        return self._world

    def _group(self, group: Group | None, what: str) -> Group:
        world = self._require_world(what)
        if group is None:
            return world
        if not isinstance(group, Group):
            raise TypeError(f"{what}: group must be a hyper_parallel Group or None, got {type(group).__name__}")
        if group._left:
            raise RuntimeError(f"{what}: the group over ranks {list(group.ranks)} belongs to a world this process "
                               "left (destroy_process_group()); create it (or its device mesh) again in the current "
                               "world")
        check.check_group_member(self._rank, group.ranks, what)
        return group

    def _check_tensor(self, what: str, x) -> None:
        if not isinstance(x, self.Tensor):
            raise TypeError(f"{what}: expected a {self.Tensor.__name__}, got {type(x).__name__}")
        check.check_dtype(self.dtype_name(x.dtype), self.collective_dtypes, self.dist_backend, what)

    def _collective_prologue(self, what: str, x, group: Group | None, op: str = "", src: int = -1) -> Group:
        group = self._group(group, what)
        self._check_tensor(what, x)
        if collective_checks.enabled():
            collective_checks.check_agreement(self, what, x, group, op=op, src=src)
        self._record(what, self._nbytes(x))
        return group

    @abc.abstractmethod
    def _init_process_group(self, env: WorldEnv, timeout_s: float) -> Any:
        """Join the world; return the native world-group handle. ``timeout_s`` is validated; every collective of
        the world must fail after it rather than hang. An adapter hosting a store runs :class:`Rendezvous`."""

    @abc.abstractmethod
    def _new_group(self, ranks: tuple[int, ...], member: bool) -> Any:
        """Create the native group; called on every rank, ``member`` says whether this one belongs."""

    @abc.abstractmethod
    def _destroy_process_group(self) -> None: ...

    @abc.abstractmethod
    def _barrier(self, group: Group) -> None: ...

    @abc.abstractmethod
    def _all_reduce(self, x, op: str, group: Group): ...

    @abc.abstractmethod
    def _all_gather_into_tensor(self, x, group: Group): ...

    @abc.abstractmethod
    def _reduce_scatter_tensor(self, x, op: str, group: Group): ...

    @abc.abstractmethod
    def _all_to_all_single(self, x, output_shape: tuple[int, ...], input_splits: list[int],
                           output_splits: list[int], group: Group, async_op: bool):
        """Return ``(output, wait)``; ``wait`` is a callable completing the op, or None when already complete."""

    @abc.abstractmethod
    def _broadcast(self, x, src: int, group: Group): ...

    @abc.abstractmethod
    def _tolist(self, x) -> list: ...

    @abc.abstractmethod
    def _to_numpy(self, x):
        """A NumPy array of ``x``'s values on the host (bfloat16 as float32)."""

    @abc.abstractmethod
    def _assign(self, param, value) -> None:
        """Copy ``value`` (same shape) into ``param`` in place, cast to its dtype, outside autograd."""
