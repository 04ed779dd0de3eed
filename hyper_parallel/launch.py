"""Local multi-process launcher for both frameworks.

``python -m hyper_parallel.launch --nproc N [--backend B] [--timeout S] [--pg-timeout S] script.py args...``
``python -m hyper_parallel.launch --nproc N [--backend B] [--timeout S] [--pg-timeout S] -m package.module args...``

Starts N copies of ``script.py`` (with ``-m``, of ``python -m package.module``, as torchrun's ``-m`` does) with the
standard environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port, and
``HYPER_PARALLEL_PLATFORM`` when ``--backend`` is given), prefixes every output line with its rank, and supervises
the world:

* all ranks exit 0: exit 0;
* a rank fails: every other rank is stopped, the failing rank's last output (its traceback) is shown again, and the
  launcher exits with that rank's exit code (128 + N for a rank killed by signal N);
* the timeout passes: every rank is stopped and the launcher exits with 124.

Each rank runs in its own process group, so stopping a rank also stops anything it spawned: no orphans. That holds
even when the launcher itself is killed with SIGKILL and cannot clean up: on Linux every rank gets SIGKILL from the
kernel when the launcher dies (``prctl(PR_SET_PDEATHSIG)``), and a small watchdog process that outlives the launcher
kills the ranks' process groups, so whatever the ranks spawned goes too.

Timeouts. ``--timeout`` bounds the whole run (default 900 s). ``--pg-timeout`` sets ``HYPER_PARALLEL_TIMEOUT`` for
the ranks: how long any collective waits for the other ranks before failing with an error instead of hanging (the
default of ``init_process_group(timeout_s=...)``, 300 s when unset). ``--start-timeout`` sets
``HYPER_PARALLEL_START_TIMEOUT``: how long a starting world waits for all its ranks before saying which did not
come (default 60 s). Both variables may also be exported instead; the launcher checks them before starting anything.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from hyper_parallel.platform import START_TIMEOUT_ENV_VAR, TIMEOUT_ENV_VAR, process_group_timeout, start_timeout

TIMEOUT_EXIT_CODE = 124
_TAIL_LINES = 60
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Set for the ranks whose output the launcher prefixes with ``[rank r]``.
PREFIXED_ENV_VAR = "HYPER_PARALLEL_OUTPUT_PREFIXED"


def world_env(rank: int, nproc: int, port: int, backend: str | None = None, addr: str = "127.0.0.1") -> dict:
    """The environment of one rank: ``os.environ`` plus the standard launcher variables."""
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR=addr, MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    if nproc > 1:
        # As torchrun does: N processes each using every core's worth of threads oversubscribe the host (measured
        # 15x slower dispatch on 2 cores). A value the user set wins.
        env.setdefault("OMP_NUM_THREADS", "1")
    if backend:
        env["HYPER_PARALLEL_PLATFORM"] = backend
    return env


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies, however it dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``); ``None`` where that is not available.

    The kernel sends the signal when the THREAD that started the child exits: start children from the thread that
    supervises them (``launch`` does, and returns only after its ranks ended).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Looked up here: between fork and exec the child must not load libraries (other threads may hold locks).
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: the signal will never come
            os.kill(os.getpid(), sig)

    return set_parent_death_signal


# Runs in a process of its own (``python -I -S -c``: no site, no imports beyond the built-ins, ~20 ms) and in a
# session of its own, so a signal to the launcher's process group does not take it along.
_WATCHDOG = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups, done = [], False
for line in sys.stdin:
    if line.strip() == "done":
        done = True
        break
    groups.append(int(line))
if not done:
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
"""


class _Watchdog:
    """Kills the ranks' process groups if the launcher dies without stopping them (SIGKILL, a crash).

    It reads one process-group id per line on a pipe from the launcher. The kernel closes the pipe when the launcher
    dies, however it dies: end of input without a final ``done`` means nobody cleaned up, and it kills every group
    it was given. The ranks themselves also get the parent-death signal; the groups catch what the ranks spawned.
    """

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, "-I", "-S", "-c", _WATCHDOG], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     text=True)

    def watch(self, pgid: int) -> None:
        try:
            self.proc.stdin.write(f"{pgid}\n")
            self.proc.stdin.flush()
        except OSError:  # the watchdog is gone: the parent-death signal still stops the ranks themselves
            pass

    def release(self) -> None:
        """The launcher stopped every rank itself: let the watchdog exit without killing anything."""
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop ``proc`` and everything in its process group: SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        _kill_group(proc.pid, signal.SIGKILL)  # leftovers of an exited rank
        return
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Rank:
    """One supervised rank: its process, an output pump thread, and the tail of its output."""

    def __init__(self, rank: int, cmd: Sequence[str], env: dict, preexec_fn: Callable[[], None] | None = None):
        self.rank = rank
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace",
                                     preexec_fn=preexec_fn)
        self._thread: threading.Thread | None = None

    def start_output(self, out, lock: threading.Lock) -> None:
        self._thread = threading.Thread(target=self._pump, args=(out, lock), daemon=True)
        self._thread.start()

    def _pump(self, out, lock: threading.Lock) -> None:
        for line in self.proc.stdout:
            self.tail.append(line)
            with lock:
                out.write(f"[rank {self.rank}] {line}")
                out.flush()

    def join_output(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5)


def _check_seconds(value, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} must be a positive, finite number of seconds, got {value!r}")


def launch(script_and_args: Sequence[str], nproc: int, backend: str | None = None, timeout_s: float = 900.0,
           out=None, python: str = sys.executable, module: bool = False, pg_timeout_s: float | None = None,
           start_timeout_s: float | None = None) -> int:
    """Run ``python script args...`` (``module=True``: ``python -m module args...``) on ``nproc`` ranks and
    supervise them; return the exit code (see module doc).

    Args:
        pg_timeout_s: ``HYPER_PARALLEL_TIMEOUT`` for the ranks (seconds a collective may wait); default: inherited.
        start_timeout_s: ``HYPER_PARALLEL_START_TIMEOUT`` for the ranks (seconds a starting world waits for its
            ranks); default: inherited.

    Raises:
        ValueError: ``nproc`` < 1, a timeout (argument or inherited variable) that is not a positive, finite number
            of seconds, no script given, or ``module=True`` with a name that is not a dotted module name (a path
            such as ``examples/x.py``).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    _check_seconds(timeout_s, "--timeout")
    timeouts = {}
    for value, flag, var in ((pg_timeout_s, "--pg-timeout", TIMEOUT_ENV_VAR),
                             (start_timeout_s, "--start-timeout", START_TIMEOUT_ENV_VAR)):
        if value is not None:
            _check_seconds(value, flag)
            timeouts[var] = f"{value:g}"
    # What the ranks will read, checked once here rather than failing on every rank.
    ranks_environ = {**os.environ, **timeouts}
    start_timeout(process_group_timeout(environ=ranks_environ), environ=ranks_environ)
    if not script_and_args:
        raise ValueError("no script given: python -m hyper_parallel.launch --nproc N script.py [args...]")
    if module and not all(part.isidentifier() for part in script_and_args[0].split(".")):
        raise ValueError(f"-m needs a dotted module name such as hyper_parallel.examples.moe_expert_parallel, got "
                         f"{script_and_args[0]!r}; run a file by its path without -m")
    out = out or sys.stdout
    lock = threading.Lock()
    port = free_port()
    cmd = [python, "-u", *(["-m"] if module else []), *script_and_args]
    # the launcher prefixes every output line with the rank: the library's log need not say it again
    envs = [{**world_env(r, nproc, port, backend), PREFIXED_ENV_VAR: "1", **timeouts} for r in range(nproc)]
    watchdog = _Watchdog(python)
    preexec_fn = parent_death_signal()
    ranks: list[_Rank] = []
    deadline = time.monotonic() + timeout_s
    failed: _Rank | None = None
    try:
        # Every rank is started before any output thread: a fork (preexec_fn forces one) is safest with one thread.
        for r, env in enumerate(envs):
            ranks.append(_Rank(r, cmd, env, preexec_fn))
            watchdog.watch(ranks[-1].proc.pid)  # its own session: the pid is its process-group id
        for r in ranks:
            r.start_output(out, lock)
        while True:
            codes = [r.proc.poll() for r in ranks]
            failed = next((r for r, c in zip(ranks, codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for r in ranks:
            stop_process_tree(r.proc)
        watchdog.release()
        for r in ranks:
            r.join_output()
    if failed is not None:
        code = failed.proc.returncode
        out.write(f"\nhyper_parallel.launch: rank {failed.rank} failed with exit code {code}; the other ranks were "
                  f"stopped. Last output of rank {failed.rank}:\n")
        out.writelines(f"  | {line}" for line in failed.tail)
        out.flush()
        return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
    if any(r.proc.returncode != 0 for r in ranks):
        out.write(f"\nhyper_parallel.launch: timed out after {timeout_s:g} s; all {nproc} ranks were stopped.\n")
        out.flush()
        return TIMEOUT_EXIT_CODE
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyper_parallel.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True, help="number of ranks to start")
    p.add_argument("--backend", default=None,
                   help="sets HYPER_PARALLEL_PLATFORM for every rank (torch, torch_npu, mindspore)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before every rank is stopped (default 900)")
    p.add_argument("--pg-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"seconds any collective waits for the other ranks before it fails instead of hanging: sets "
                        f"{TIMEOUT_ENV_VAR} for every rank (default: inherited, else 300)")
    p.add_argument("--start-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"seconds a starting world waits for all its ranks before saying which did not come: sets "
                        f"{START_TIMEOUT_ENV_VAR} for every rank (default: inherited, else 60)")
    p.add_argument("-m", "--module", action="store_true",
                   help="run the script argument as a module, like `python -m` (e.g. -m "
                        "hyper_parallel.examples.moe_expert_parallel)")
    p.add_argument("script", help="the Python script every rank runs (with -m: the module)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.backend is not None:
        from hyper_parallel._select import resolve_backend_name

        try:
            args.backend = resolve_backend_name(args.backend)
        except ValueError as e:
            print(f"hyper_parallel.launch: error: {e}", file=sys.stderr)
            return 2
    try:
        return launch([args.script, *args.args], args.nproc, args.backend, args.timeout, module=args.module,
                      pg_timeout_s=args.pg_timeout, start_timeout_s=args.start_timeout)
    except ValueError as e:
        print(f"hyper_parallel.launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    # A SIGTERM to the launcher must still stop the ranks: turn it into an exception so `finally` runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
