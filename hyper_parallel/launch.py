"""Local multi-process launcher for both frameworks.

``python -m hyper_parallel.launch --nproc N [--backend B] [--timeout S] script.py args...``
``python -m hyper_parallel.launch --nproc N [--backend B] [--timeout S] -m package.module args...``

Starts N copies of ``script.py`` (with ``-m``, of ``python -m package.module``, as torchrun's ``-m`` does) with the
standard environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port, and
``HYPER_PARALLEL_PLATFORM`` when ``--backend`` is given), prefixes every output line with its rank, and supervises
the world:

* all ranks exit 0: exit 0;
* a rank fails: every other rank is stopped, the failing rank's last output (its traceback) is shown again, and the
  launcher exits with that rank's exit code (128 + N for a rank killed by signal N);
* the timeout passes: every rank is stopped and the launcher exits with 124.

Each rank runs in its own process group, so stopping a rank also stops anything it spawned: no orphans.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

TIMEOUT_EXIT_CODE = 124
_TAIL_LINES = 60


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

    def __init__(self, rank: int, cmd: Sequence[str], env: dict, out, lock: threading.Lock):
        self.rank = rank
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace")
        self._thread = threading.Thread(target=self._pump, args=(out, lock), daemon=True)
        self._thread.start()

    def _pump(self, out, lock: threading.Lock) -> None:
        for line in self.proc.stdout:
            self.tail.append(line)
            with lock:
                out.write(f"[rank {self.rank}] {line}")
                out.flush()

    def join_output(self) -> None:
        self._thread.join(timeout=5)


def launch(script_and_args: Sequence[str], nproc: int, backend: str | None = None, timeout_s: float = 900.0,
           out=None, python: str = sys.executable, module: bool = False) -> int:
    """Run ``python script args...`` (``module=True``: ``python -m module args...``) on ``nproc`` ranks and
    supervise them; return the exit code (see module doc).

    Raises:
        ValueError: ``nproc`` < 1, ``timeout_s`` <= 0, no script given, or ``module=True`` with a name that is
            not a dotted module name (a path such as ``examples/x.py``).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"--timeout must be a positive, finite number of seconds, got {timeout_s!r}")
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
    envs = [{**world_env(r, nproc, port, backend), PREFIXED_ENV_VAR: "1"} for r in range(nproc)]
    ranks = [_Rank(r, cmd, env, out, lock) for r, env in enumerate(envs)]
    deadline = time.monotonic() + timeout_s
    failed: _Rank | None = None
    try:
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
        return launch([args.script, *args.args], args.nproc, args.backend, args.timeout, module=args.module)
    except ValueError as e:
        print(f"hyper_parallel.launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    # A SIGTERM to the launcher must still stop the ranks: turn it into an exception so `finally` runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
