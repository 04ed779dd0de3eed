"""The cross-framework driver: every backend runs the same cells with the same seeded counts, each in its own
worker processes (one framework per process, through :class:`hyper_parallel.testing.World`), and the report puts
the numbers side by side: each backend's own ratios and, with both backends, ``mindspore / torch``.

The workers run with ``OMP_NUM_THREADS=1`` unless it is set (torchrun's default for several processes per host).
"""

from __future__ import annotations

import datetime
import math
import os
import platform as _pyplatform
import statistics
import time
from collections.abc import Sequence
from typing import TextIO

from hyper_parallel._console import Progress
from hyper_parallel.bench.dispatch import dispatch_cell
from hyper_parallel.bench.permute import permute_cell
from hyper_parallel.bench.sweep import ALIGN, BACKENDS, HIDDEN, LOCAL_EXPERTS, Sweep

__all__ = ["run", "build_report", "progress_line"]


def progress_line(total: int, enabled: bool, stream: TextIO | None = None) -> Progress:
    """The bench's progress on stderr: a line per step off a terminal (steps are seconds long, and the last line
    of a log names the cell that hangs); redrawn at every step on a terminal, and erased before the tables."""
    return Progress("bench", total, stream=stream, enabled=enabled, show_elapsed=True, log_lines=None,
                    min_redraw_s=0.0, keep=False)


def run(backends: Sequence[str], sweep: Sweep, progress: bool = True) -> dict:
    """Measure every cell of ``sweep`` on each backend; return the report (see
    :func:`~hyper_parallel.bench.report.format_report`).

    Raises:
        hyper_parallel.testing.RankError: a cell failed on a worker (its check, or an error).
        hyper_parallel.testing.WorldTimeout: a cell ran past its timeout.
    """
    from hyper_parallel.testing import World

    world_size = max([2, *sweep.dispatch_nprocs])
    steps = len(backends) * (1 + len(sweep.permute_cells())
                             + len(sweep.dispatch_nprocs) * len(sweep.dispatch_tokens))
    bar = progress_line(steps, progress)
    args = sweep.timing_args()
    permute: dict = {}
    dispatch: dict = {}
    versions: dict = {}
    t_start, load_before = time.monotonic(), _loadavg()
    threads = os.environ.get("OMP_NUM_THREADS") or "1"
    try:
        for backend in backends:
            # One world per backend, of the largest size: a cell on fewer ranks leaves the others idle (blocked on
            # their next message, using no CPU).
            bar.step(f"{backend}: starting a {world_size}-process world")
            world = World(backend, world_size)  # the launcher's environment: one OpenMP thread per rank
            world.start()
            try:
                versions[backend] = world.run(_versions)[0]
                for t, r, e in sweep.permute_cells():
                    bar.step(f"{backend}: permute T={t} RxE={r}x{e}")
                    res = world.run(permute_cell, t, r, e, args, timeout_s=600)[0]
                    permute.setdefault((t, r, e), {})[backend] = {k: statistics.median(v) for k, v in res.items()}
                for nproc in sweep.dispatch_nprocs:
                    for t in sweep.dispatch_tokens:
                        bar.step(f"{backend}: dispatch+combine on {nproc} processes, {t} rows/rank")
                        res = world.run(dispatch_cell, nproc, t, args, timeout_s=600)[:nproc]
                        # a round trip takes as long as its slowest rank
                        dispatch.setdefault((nproc, t), {})[backend] = {
                            k: statistics.median([max(ts) for ts in zip(*(r[k] for r in res))]) for k in res[0]}
            finally:
                world.stop()
    finally:
        bar.close()
    report = build_report(backends, sweep, permute, dispatch, versions, time.monotonic() - t_start)
    report["meta"]["load_average_1min"] = {"before": load_before, "after": _loadavg()}
    report["meta"]["omp_num_threads_per_rank"] = threads
    return report


def build_report(backends: Sequence[str], sweep: Sweep, permute: dict, dispatch: dict, versions: dict,
                 elapsed_s: float) -> dict:
    """The report of a run: its ``meta`` (machine, versions, time) and a row per cell with its median seconds per
    backend and its ratios.

    Args:
        backends: the backends measured, torch first.
        sweep: the sweep they ran.
        permute: ``{(T, R, E): {backend: {"vectorized": s, "loop": s}}}``.
        dispatch: ``{(nproc, T): {backend: {"dispatch_combine": s, "raw_all_to_all": s}}}``.
        versions: ``{backend: {package: version}}``.
        elapsed_s: the run's wall time.
    """
    both = all(b in backends for b in BACKENDS)
    rows_p, rows_d = [], []
    for (t, r, e), sec in permute.items():
        ratios = {f"{b}:loop/vectorized": _ratio(sec[b]["loop"], sec[b]["vectorized"]) for b in backends}
        if both:
            ratios.update({f"mindspore/torch:{k}": _ratio(sec["mindspore"][k], sec["torch"][k])
                           for k in ("vectorized", "loop")})
        rows_p.append({"tokens": t, "ranks": r, "local_experts": e, "align": ALIGN, "seconds": sec,
                       "ratios": ratios})
    for (n, t), sec in sorted(dispatch.items()):
        ratios = {f"{b}:dispatch_combine/raw": _ratio(sec[b]["dispatch_combine"], sec[b]["raw_all_to_all"])
                  for b in backends}
        if both:
            ratios.update({f"mindspore/torch:{k}": _ratio(sec["mindspore"][k], sec["torch"][k])
                           for k in ("dispatch_combine", "raw_all_to_all")})
        rows_d.append({"nproc": n, "tokens_per_rank": t, "hidden": HIDDEN, "local_experts": LOCAL_EXPERTS,
                       "bytes_per_rank": t * HIDDEN * 4, "seconds": sec, "ratios": ratios})
    return {
        "meta": {"date": datetime.date.today().isoformat(), "backends": list(backends), "versions": versions,
                 "machine": f"{_cpu_model()}, {_pyplatform.machine()} {_pyplatform.system()}, "
                            f"{os.cpu_count()} CPU cores",
                 "python": _pyplatform.python_version(), "max_repeats": sweep.max_repeats,
                 "elapsed_s": round(elapsed_s, 1), "statistic": "median of repeats, seconds per call"},
        "permute": rows_p,
        "dispatch": rows_d,
    }


def _versions() -> dict:
    """The framework versions, as a worker sees them."""
    from hyper_parallel._select import get_platform

    return get_platform().versions()


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _cpu_model() -> str:
    """The CPU's model name where Linux tells it, else the processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return _pyplatform.processor() or "unknown CPU"  # pragma: no cover - not Linux


def _loadavg() -> float | None:
    """The 1-minute load average (other work on the machine skews every time; the ratios less so)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - platforms without getloadavg
        return None
