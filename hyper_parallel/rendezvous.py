"""Joining a world: the launcher environment (:class:`WorldEnv`), the timeouts, and the start-up checks every rank
runs before the framework's own rendezvous (:class:`Rendezvous`), so that a world started wrongly fails fast with a
message naming the setting that is wrong instead of waiting out the process-group timeout.

``HYPER_PARALLEL_TIMEOUT`` (seconds) is the process-group timeout every collective uses;
``HYPER_PARALLEL_START_TIMEOUT`` bounds the start-up (see docs/failure_modes.md).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["DEFAULT_START_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "Rendezvous", "START_TIMEOUT_ENV_VAR", "TIMEOUT_ENV_VAR",
           "WorldEnv", "process_group_timeout", "start_timeout"]


#: Seconds a collective (and the framework's own rendezvous) may wait before failing: the default of
#: :meth:`Platform.init_process_group`'s ``timeout_s``.
TIMEOUT_ENV_VAR = "HYPER_PARALLEL_TIMEOUT"
#: Seconds every rank of a starting world has to reach the rendezvous (see :class:`Rendezvous`); capped by the
#: process-group timeout.
START_TIMEOUT_ENV_VAR = "HYPER_PARALLEL_START_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
# Long enough for ranks of one job started a few seconds apart on a loaded host (importing MindSpore takes 5-7 s on
# 2 cores), short enough that a mis-started world speaks well before the 300 s collective timeout.
DEFAULT_START_TIMEOUT_S = 60.0


def _seconds(value: Any, name: str) -> float:
    """``value`` as a positive, finite number of seconds.

    Raises:
        ValueError: ``value`` is not a number, or not positive and finite; the message names ``name`` and the value.
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds (such as 600), got {value!r}")
    return seconds


def process_group_timeout(timeout_s: float | None = None, environ: Mapping[str, str] | None = None) -> float:
    """The process-group timeout in seconds: ``timeout_s`` when given, else ``HYPER_PARALLEL_TIMEOUT`` in
    ``environ`` (default ``os.environ``), else 300.

    Raises:
        ValueError: the value (argument or variable; an empty variable counts as unset) is not a positive, finite
            number of seconds.
    """
    if timeout_s is not None:
        return _seconds(timeout_s, "init_process_group(timeout_s=...)")
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV_VAR, "").strip()
    return _seconds(raw, TIMEOUT_ENV_VAR) if raw else DEFAULT_TIMEOUT_S


def start_timeout(timeout_s: float, environ: Mapping[str, str] | None = None) -> float:
    """The start-up timeout in seconds: ``HYPER_PARALLEL_START_TIMEOUT`` in ``environ`` (default ``os.environ``;
    unset: 60), at most ``timeout_s``.

    Raises:
        ValueError: the variable is set to something other than a positive, finite number of seconds.
    """
    raw = (os.environ if environ is None else environ).get(START_TIMEOUT_ENV_VAR, "").strip()
    return min(_seconds(raw, START_TIMEOUT_ENV_VAR) if raw else DEFAULT_START_TIMEOUT_S, timeout_s)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldEnv:
    """The standard launcher environment (torchrun, ``python -m hyper_parallel.launch``, msrun-compatible)."""

    rank: int
    """Global rank of this process (``RANK``)."""
    world_size: int
    """Number of processes (``WORLD_SIZE``)."""
    local_rank: int
    """Rank on this host, used to pick the device (``LOCAL_RANK``, default: ``rank``)."""
    master_addr: str
    """Host of the rendezvous store (``MASTER_ADDR``, default ``127.0.0.1``)."""
    master_port: int
    """Port of the rendezvous store (``MASTER_PORT``)."""
    agent_store: bool = False
    """torchrun's agent hosts the store (``TORCHELASTIC_USE_AGENT_STORE=True``): every rank, rank 0 included, is a
    client of it, and no rank binds ``MASTER_PORT``."""

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> WorldEnv:
        """Read the world from ``environ`` (default ``os.environ``).

        Raises:
            ValueError: if RANK, WORLD_SIZE or MASTER_PORT is missing or not an integer, rank is out of range,
                LOCAL_RANK is negative or MASTER_PORT is not a TCP port (1..65535).
        """
        env = os.environ if environ is None else environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(
                f"init_process_group() needs the launcher environment; missing {missing}. Start the script with "
                "`python -m hyper_parallel.launch --nproc N script.py` or torchrun"
            )
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            port, local = int(env["MASTER_PORT"]), int(env.get("LOCAL_RANK", env["RANK"]))
        except ValueError as e:
            raise ValueError(f"RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers: {e}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK must satisfy 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
        if not 0 < port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port in 1..65535, got MASTER_PORT={port}")
        if local < 0:
            raise ValueError(f"LOCAL_RANK must be >= 0, got LOCAL_RANK={local}")
        return cls(rank=rank, world_size=world, local_rank=local,
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port,
                   agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


class Rendezvous:
    """Start-up checks around a framework's own rendezvous, so that a mis-started world fails fast with a message
    naming the setting to fix instead of waiting out the process-group timeout.

    Each check runs once per :meth:`Platform.init_process_group`, before the framework's own init; none touches the
    collectives. An adapter whose ranks meet through a TCP store hosted by rank 0 uses it in this order:

    1. rank 0 (:attr:`is_master`): :meth:`listen_socket` (hand it to the store) or :meth:`check_port` (a store that
       binds by itself); every other rank: :meth:`wait_for_master`;
    2. it creates the framework's store (its client calls go through :meth:`store_call`);
    3. :meth:`join`: every rank announces its RANK and WORLD_SIZE, and waits for all of them.

    What each check catches, within ``HYPER_PARALLEL_START_TIMEOUT`` (:func:`start_timeout`) at most:

    * ``MASTER_ADDR`` that does not resolve: at once, on every rank (ValueError);
    * ``MASTER_PORT`` busy on rank 0 (another job, a leftover run, a second ``RANK=0``): at once (RuntimeError);
    * ranks that disagree on ``WORLD_SIZE``, or two processes with one ``RANK``: as soon as both have joined
      (ValueError);
    * rank 0 not running, or unreachable at ``MASTER_ADDR:MASTER_PORT``: the other ranks, at the start-up timeout;
    * a rank that never joins: every joined rank, at the start-up timeout, listing who joined and who did not.

    Args:
        env: this rank's launcher environment.
        timeout_s: the process-group timeout; the start-up timeout is capped by it.
        generation: how many worlds this process joined before; every rank of a world passes the same value, and a
            world re-created in the same process (after ``destroy_process_group``) meets under fresh keys.

    Raises:
        ValueError: ``MASTER_ADDR`` does not resolve, or ``HYPER_PARALLEL_START_TIMEOUT`` is malformed.
    """

    def __init__(self, env: WorldEnv, timeout_s: float, generation: int = 0):
        self.env = env
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout(timeout_s)
        self.deadline = time.monotonic() + self.start_timeout_s
        self.generation = generation
        self.family, self.address = self._resolve(env)
        self.is_master = env.rank == 0 and not env.agent_store
        """Whether this rank hosts the store: rank 0, unless torchrun's agent hosts it."""
        self.loopback = _names_loopback(env.master_addr)
        """``MASTER_ADDR`` is a loopback address or ``localhost``: a single-host launch, whose store must not listen
        beyond this host. A host NAME that merely resolves to loopback here does not count: Debian-style
        ``/etc/hosts`` map the machine's own name to 127.0.1.1 while other hosts resolve it to a real address."""

    @staticmethod
    def _resolve(env: WorldEnv) -> tuple[int, str]:
        try:
            infos = socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise ValueError(
                f"MASTER_ADDR={env.master_addr!r} does not resolve to an address ({e}); set it to the host name or IP "
                "address of rank 0's host (127.0.0.1 when every rank runs on this host)") from None
        # IPv4 first, as the frameworks' stores connect
        family, *_, sockaddr = min(infos, key=lambda info: info[0] != socket.AF_INET)
        return family, sockaddr[0]

    @property
    def namespace(self) -> str:
        """A key prefix unique to this world: torchrun may restart a job against the same agent store, and a
        process may join several worlds (``generation``); each meets under its own keys."""
        return "{}/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""),
                                 os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), self.generation)

    @property
    def where(self) -> str:
        """The store's settings as the user wrote them, for messages."""
        return f"MASTER_ADDR={self.env.master_addr} MASTER_PORT={self.env.master_port}"

    def listen_socket(self, host: str | None = None) -> socket.socket:
        """A socket bound to ``MASTER_PORT`` and listening, for rank 0's store.

        Args:
            host: the address to bind; default: ``MASTER_ADDR``'s address when it is a loopback address (a local
                launch: nothing outside this host can reach the store), else every interface (``MASTER_ADDR`` may
                be a name other hosts resolve to an address this host does not own, behind NAT or a service).

        Raises:
            RuntimeError: the port is in use or needs privileges (the message names ``MASTER_PORT``).
            ValueError: ``host`` is not an address of this host (the message names ``MASTER_ADDR``).
        """
        if host is None:
            host = self.address if self.loopback else ("::" if self.family == socket.AF_INET6 else "0.0.0.0")
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            # As the frameworks' store servers do: a port whose last connections linger in TIME_WAIT is free to use.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, self.env.master_port))
            sock.listen(socket.SOMAXCONN)
        except OSError as e:
            sock.close()
            raise self._bind_error(e, host) from None
        return sock

    def check_port(self, host: str | None = None) -> None:
        """Check that rank 0 can bind ``MASTER_PORT`` (on ``host``, see :meth:`listen_socket`), for a store that
        binds by itself. The port is released at once; a process taking it in between is reported by the store."""
        self.listen_socket(host).close()

    def _bind_error(self, e: OSError, host: str) -> Exception:
        what = (f"rank 0 cannot host the rendezvous store at {self.where} (binding {host}:{self.env.master_port}: "
                f"{e.strerror or e})")
        if e.errno == errno.EADDRINUSE:
            return RuntimeError(
                f"{what}: MASTER_PORT={self.env.master_port} is already in use on this host, by another job, an "
                "earlier run still alive, or a second process started with RANK=0. Pick a free MASTER_PORT "
                "(python -m hyper_parallel.launch picks one itself)")
        if e.errno == errno.EADDRNOTAVAIL:
            return ValueError(
                f"{what}: MASTER_ADDR={self.env.master_addr!r} ({self.address}) is not an address of this host. "
                "Rank 0 hosts the store, so MASTER_ADDR must name rank 0's host")
        if e.errno == errno.EACCES:
            return RuntimeError(f"{what}: MASTER_PORT={self.env.master_port} needs privileges on this host; use a "
                                "port in 1024..65535")
        return RuntimeError(f"{what}; check MASTER_ADDR and MASTER_PORT")

    def wait_for_master(self) -> None:
        """Block until the store at ``MASTER_ADDR:MASTER_PORT`` accepts a connection (rank 0 may start later than
        this rank); a plain TCP connection, closed at once.

        Raises:
            RuntimeError: no connection within the start-up timeout; the message says what to check.
        """
        last = "none"
        while (remaining := self.deadline - time.monotonic()) > 0:
            try:
                with socket.create_connection((self.address, self.env.master_port), timeout=min(remaining, 2.0)):
                    return
            except OSError as e:  # refused: not listening yet; timeout: unreachable so far
                # Its text only: a kept exception holds its traceback's frames, and through them the callers' locals
                # (the new process group among them) until a garbage collection; a process group freed only at
                # interpreter exit made torch abort ("terminate called without an active exception") in 3% of runs.
                last = str(e)
            time.sleep(min(0.05, max(0.0, self.deadline - time.monotonic())))
        hosts = "torchrun's agent" if self.env.agent_store else "rank 0"
        raise RuntimeError(
            f"rank {self.env.rank} could not reach the rendezvous store at {self.where} within "
            f"{self.start_timeout_s:g} s ({START_TIMEOUT_ENV_VAR}; last error: {last}). {hosts.capitalize()} hosts "
            f"the store: check that {hosts} is running and did not fail, that every rank has the same MASTER_ADDR and "
            "MASTER_PORT, and that MASTER_ADDR is reachable from this host")

    def open_store(self, fn: Callable[[], Any]) -> Any:
        """Create the framework's store with ``fn``; a failure becomes a RuntimeError naming the settings."""
        try:
            return fn()
        except Exception as e:  # each framework raises its own store errors (re-raised, chained)
            role = "host" if self.is_master else "connect to"
            raise RuntimeError(
                f"rank {self.env.rank} could not {role} the rendezvous store at {self.where} ({_first_line(e)}); "
                "check that MASTER_ADDR names rank 0's host and is reachable from this host, and that MASTER_PORT "
                "is free there") from e

    def store_call(self, fn: Callable[[], Any], during: str = "start-up") -> Any:
        """Run one store operation; a failure (the store went away: rank 0 failed or exited) becomes a
        RuntimeError saying so."""
        try:
            return fn()
        except Exception as e:  # each framework raises its own store errors (re-raised, chained)
            raise RuntimeError(
                f"rank {self.env.rank} lost the rendezvous store at {self.where} during {during} ({_first_line(e)}); "
                "the store lives in rank 0: see rank 0's output for why it failed or exited") from e

    def join(self, store: Any) -> None:
        """Announce this rank in ``store`` and wait until every rank of the world has: the check that every rank
        was started, into the same world.

        ``store`` needs ``add(key, int) -> int``, ``set(key, str)`` and ``get(key) -> bytes`` (torch's and
        MindSpore's TCPStore). Every rank polls one counter; a few round trips in all once the world is complete.

        Raises:
            ValueError: ranks report different ``WORLD_SIZE`` values, or two processes report the same ``RANK``.
            RuntimeError: some rank did not join within the start-up timeout (the message lists who joined and who
                did not), or the store went away.
        """
        env = self.env
        ns = f"hyper_parallel/join/{self.namespace}"
        me = {"rank": env.rank, "world_size": env.world_size, "host": socket.gethostname(), "pid": os.getpid()}
        slot = self.store_call(lambda: store.add(f"{ns}/count", 1))
        self.store_call(lambda: store.set(f"{ns}/{slot}", json.dumps(me)))
        seen: list[dict] = []
        delay = 0.01
        while True:
            count = int(self.store_call(lambda: store.add(f"{ns}/count", 0)))
            while len(seen) < count:  # a slot is written right after it is taken: this get waits microseconds
                seen.append(json.loads(self.store_call(lambda: store.get(f"{ns}/{len(seen) + 1}"))))
            try:
                self._check_arrivals(seen)
            except ValueError:
                self._told(store, f"{ns}/told", len(seen))
                raise
            if {a["rank"] for a in seen} >= set(range(env.world_size)):
                return
            if time.monotonic() > self.deadline:
                raise RuntimeError(self._incomplete(seen))
            time.sleep(delay)
            delay = min(2 * delay, 0.1)

    def _told(self, store: Any, key: str, ranks: int) -> None:
        """Count this rank among those told of a bad world; the store's host waits (5 s at most) until the ``ranks``
        it saw were told too, so that they read the same error rather than a store gone away."""
        try:
            store.add(key, 1)
            deadline = time.monotonic() + 5.0
            while self.is_master and int(store.add(key, 0)) < ranks and time.monotonic() < deadline:
                time.sleep(0.01)
        except Exception:  # noqa: BLE001 - the store went away: the error being raised says what matters
            pass

    def barrier(self, store: Any, phase: str) -> None:
        """Wait, within the start-up timeout, until every rank has reached ``phase`` (after :meth:`join`).

        For a start-up step whose time differs between ranks (rank 0 hosts the store) and which is followed by a
        collective bounded by the shorter collective timeout.

        Raises:
            RuntimeError: some rank did not reach ``phase`` in time (the message says how many did).
        """
        self._count_in(store, phase, self.env.world_size, self.deadline, "start-up",
                       f"the start-up timeout of {self.start_timeout_s:g} s")

    def leave(self, store: Any, timeout_s: float | None = None) -> None:
        """Line the ranks up on ``store`` before they tear the world down, within the process-group timeout (or
        ``timeout_s``).

        A barrier through the store rather than a collective: after a collective, the rank that sent last may still
        wait for its peers' acknowledgements, which a peer that tears down at once never sends (seen with mccl: the
        sender waited out the whole collective timeout). Once every rank reached this point, every collective before
        it has completed everywhere. The store's host (rank 0) then also waits until every other rank has seen the
        world complete, so the store outlives every rank's last call to it.

        Raises:
            RuntimeError: some rank did not come within the process-group timeout (the message says how many did),
                or the store went away.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        within = f"{timeout_s:g} s" if timeout_s != self.timeout_s else f"the process-group timeout of {timeout_s:g} s"
        world = self.env.world_size
        try:
            self._count_in(store, "leaving", world, deadline, "teardown", within)
        except RuntimeError:
            if not self.is_master:  # leaving anyway: the store's host must not wait for this rank as well
                self._say_left(store)
            raise
        if self.is_master:
            self._count_in(store, "left", world, deadline, "teardown", within)
        else:
            self._say_left(store)

    def _say_left(self, store: Any) -> None:
        self.store_call(lambda: store.add(f"hyper_parallel/left/{self.namespace}", 1), "teardown")

    def _count_in(self, store: Any, phase: str, expected: int, deadline: float, during: str, within: str) -> None:
        """Add this rank to ``phase``'s counter, then poll until it reaches ``expected``; past ``deadline``, raise a
        RuntimeError naming the phase and how many ranks came."""
        key = f"hyper_parallel/{phase}/{self.namespace}"
        self.store_call(lambda: store.add(key, 1), during)
        delay = 0.005
        while (count := int(self.store_call(lambda: store.add(key, 0), during))) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} of {expected} ranks reached {phase!r} at {self.where} within {within}; "
                                   "the others are stuck or gone")
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _check_arrivals(self, seen: list[dict]) -> None:
        env = self.env

        def who(a: dict) -> str:
            return f"rank {a['rank']} (host {a['host']}, pid {a['pid']})"

        if any(a["world_size"] != env.world_size for a in seen):
            sizes = ", ".join(f"{who(a)}: WORLD_SIZE={a['world_size']}" for a in sorted(seen, key=lambda a: a["rank"]))
            raise ValueError(
                f"WORLD_SIZE differs between the ranks at {self.where}: {sizes}. Every rank must be started with the "
                f"same WORLD_SIZE (this process: RANK={env.rank}, WORLD_SIZE={env.world_size})")
        by_rank: dict[int, list[dict]] = collections.defaultdict(list)
        for a in seen:
            by_rank[a["rank"]].append(a)
        for rank, claims in sorted(by_rank.items()):
            if len(claims) > 1:
                raise ValueError(
                    f"RANK={rank} was given to {len(claims)} processes at {self.where}: "
                    f"{', '.join(who(a) for a in claims)}. Every process needs its own RANK in 0..{env.world_size - 1}")

    def _incomplete(self, seen: list[dict]) -> str:
        joined = sorted({a["rank"] for a in seen})
        missing = [r for r in range(self.env.world_size) if r not in joined]
        return (
            f"rank {self.env.rank}: the world did not assemble within {self.start_timeout_s:g} s "
            f"({START_TIMEOUT_ENV_VAR}): ranks {joined} joined the rendezvous at {self.where}, each with WORLD_SIZE="
            f"{self.env.world_size}; ranks {missing} did not. Check that every rank was started (RANK 0.."
            f"{self.env.world_size - 1}, the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT) and did not fail (see "
            f"its output); if ranks start slowly, raise {START_TIMEOUT_ENV_VAR}")


def _names_loopback(addr: str) -> bool:
    """Whether ``addr`` is literally a loopback address (``127.0.0.1``, ``::1``...) or ``localhost``."""
    if addr.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:  # a host name
        return False


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message``: the frameworks append C++ stack traces to theirs."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
