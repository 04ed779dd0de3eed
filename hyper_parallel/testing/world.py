"""A reusable world of N worker processes for running many test cases on one process group.

Starting a world costs 5-9 s and MindSpore allows one process-group init per process, so tests do not launch a
world each: a :class:`World` starts N workers once (see :mod:`hyper_parallel.testing._worker`), and
:meth:`World.run` ships a module-level function with its arguments to every rank and gathers the results.

Failure handling, so a broken case never hangs or poisons the run:

* a rank that raises: :class:`RankError` carries the rank and its traceback;
* ranks that do not answer within the timeout (a hung collective): :class:`WorldTimeout`;
* in both cases where some rank did not come back, the world is stopped and the next :meth:`World.run` starts a
  fresh one.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from hyper_parallel.launch import free_port, stop_process_tree, world_env
from hyper_parallel.platform import START_TIMEOUT_ENV_VAR


class RankError(AssertionError):
    """A case raised on at least one rank. The message holds each failing rank's traceback."""


class WorldTimeout(AssertionError):
    """Ranks did not answer in time (a hung or mismatched collective); the world was stopped."""


class World:
    """N worker processes sharing one process group of ``backend``.

    Args:
        backend: value of ``HYPER_PARALLEL_PLATFORM`` for the workers.
        nproc: number of ranks.
        platform_class: optional ``"module:Class"`` the workers instantiate instead of resolving ``backend``
            (used to run an adapter's logic on another device, e.g. the NPU adapter on CPU/gloo).
        start_timeout_s: seconds allowed for all ranks to join.
    """

    def __init__(self, backend: str, nproc: int, platform_class: str | None = None, start_timeout_s: float = 180.0):
        self.backend, self.nproc, self.platform_class = backend, nproc, platform_class
        self.start_timeout_s = start_timeout_s
        self._procs: list[subprocess.Popen] = []
        self._conns: list[mpc.Connection] = []
        self._logs: list[Any] = []

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def start(self) -> None:
        authkey = secrets.token_bytes(16)
        listener = mpc.Listener(("127.0.0.1", 0), authkey=authkey)
        port = free_port()
        for rank in range(self.nproc):
            env = world_env(rank, self.nproc, port, self.backend)
            # The workers' start-up check waits as long as this harness does (a user's own setting wins).
            env.setdefault(START_TIMEOUT_ENV_VAR, f"{self.start_timeout_s:g}")
            env["HYPER_PARALLEL_WORKER_ADDRESS"] = f"{listener.address[0]}:{listener.address[1]}"
            env["HYPER_PARALLEL_WORKER_AUTHKEY"] = authkey.hex()
            if self.platform_class:
                env["HYPER_PARALLEL_WORKER_PLATFORM_CLASS"] = self.platform_class
            log = tempfile.TemporaryFile(mode="w+")
            self._logs.append(log)
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "hyper_parallel.testing._worker"], env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        conns: dict[int, mpc.Connection] = {}

        def accept() -> None:
            while len(conns) < self.nproc:
                conn = listener.accept()
                conns[conn.recv()] = conn

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        deadline = time.monotonic() + self.start_timeout_s
        while acceptor.is_alive() and time.monotonic() < deadline and all(p.poll() is None for p in self._procs):
            acceptor.join(0.1)
        listener.close()
        if len(conns) < self.nproc:
            logs = self._collect_logs()
            self.stop()
            raise WorldTimeout(f"{self.backend} world of {self.nproc} ranks did not start within "
                               f"{self.start_timeout_s:g} s (or a rank died); worker output:\n{logs}")
        self._conns = [conns[r] for r in range(self.nproc)]
        for conn in self._conns:  # each rank reports ("ready", info) once its process group is up
            kind, info = conn.recv()
            assert kind == "ready", info

    def run(self, fn: Callable, *args, timeout_s: float = 120.0, **kwargs) -> list:
        """Call ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order.

        ``fn`` must be importable by the workers (a module-level function); arguments and results are pickled.

        Raises:
            RankError: ``fn`` raised on some rank (each failing rank's traceback is in the message).
            WorldTimeout: some rank did not answer within ``timeout_s``; the world is stopped.
        """
        if not self.alive:
            self.stop()
            self.start()
        try:
            for conn in self._conns:
                conn.send((fn, args, kwargs))
        except OSError:  # a worker died since the last case: start afresh and send again
            self.stop(graceful=False)
            self.start()
            for conn in self._conns:
                conn.send((fn, args, kwargs))
        replies: dict[int, tuple] = {}
        dead = False
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.nproc:
            waiting = [c for r, c in enumerate(self._conns) if r not in replies]
            ready = mpc.wait(waiting, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                try:
                    replies[self._conns.index(conn)] = conn.recv()
                except EOFError:
                    replies[self._conns.index(conn)] = ("err", "worker process exited:\n" + self._collect_logs())
                    dead = True
            # Once a rank has failed, its peers may be stuck in a collective it never joined: give them
            # a short grace period rather than the full timeout.
            if any(kind == "err" for kind, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + 10.0)
        errors = {r: body for r, (kind, body) in sorted(replies.items()) if kind == "err"}
        missing = [r for r in range(self.nproc) if r not in replies]
        if missing or dead:
            self.stop(graceful=False)
        name = getattr(fn, "__qualname__", repr(fn))
        if errors:
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
            extra = f"\n(ranks {missing} did not answer; the world was restarted)" if missing else ""
            raise RankError(f"{name} failed on {self.backend} x{self.nproc}:\n{text}{extra}")
        if missing:
            raise WorldTimeout(f"{name} on {self.backend} x{self.nproc}: ranks {missing} did not answer within "
                               f"{timeout_s:g} s (a hung collective?); the world was stopped")
        return [replies[r][1] for r in range(self.nproc)]

    def stop(self, graceful: bool = True) -> None:
        """Ask the workers to exit (they flush coverage data), then make sure they are gone.

        ``graceful=False`` (a rank is stuck or dead) skips the wait: the workers are terminated at once.
        """
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + (20.0 if graceful else 0.0)
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            stop_process_tree(proc, grace_s=2.0)
        for c in self._conns:
            c.close()
        for log in self._logs:
            log.close()
        self._procs, self._conns, self._logs = [], [], []

    def _collect_logs(self) -> str:
        out = []
        for rank, log in enumerate(self._logs):
            log.flush()
            log.seek(0)
            out.append(f"--- rank {rank} output ---\n{log.read()[-4000:]}")
        return "\n".join(out)

    def __enter__(self) -> World:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

