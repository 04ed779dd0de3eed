"""CPU benchmarks: ``hyper-parallel bench`` (also ``python -m hyper_parallel.bench``).

Everything is printed as ratios measured in one run, on the same machine, under the same load:

* **permute**: the index build of :func:`~hyper_parallel.expert_parallel.permute.build_permute_indices`
  (vectorized, no loop over experts or ranks) against :func:`permute_indices_loop`, a per-(expert, rank) loop
  like the CPU reference of torchtitan's ``generate_permute_indices``; swept over the rows received ``T`` and the
  EP layout ``R x E`` (ranks x local experts), alignment 8. Both get the counts already on the host, so the ratio
  is the cost of the loop of ``R * E`` slice writes against a fixed sequence of whole-tensor ops. It runs on rank 0
  while the other ranks wait idle.
* **dispatch**: :func:`~hyper_parallel.expert_parallel.dispatch.token_dispatch` +
  :func:`~hyper_parallel.expert_parallel.dispatch.token_combine` (counts all-to-all, one host sync, token
  all-to-all, permute, unpermute, token all-to-all back) against two raw ``all_to_all_single`` calls that move the
  same rows with the same split sizes; on 2 and 4 local processes (the first ranks of one 4-process world, the
  others idle), swept over the rows each rank routes.
* **torch vs MindSpore**: every backend runs the same cells with the same seeded counts, each in its own worker
  processes (one framework per process, through :class:`hyper_parallel.testing.World`); each row reports
  ``mindspore / torch``.

Timing: one warm-up call (checked against the reference: same indices, rows back where they started), then repeats
of a batch of calls sized from the warm-up; a repeat's time is its batch's time per call (in the dispatch cells: the
slowest rank's, every repeat starting at a barrier), and a cell reports the median repeat. The number of repeats
shrinks for slow cells (at least 3) so that the default run stays within a few minutes on 2 cores. The workers run
with ``OMP_NUM_THREADS=1`` unless it is set (torchrun's default for several processes per host).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform as _pyplatform
import random
import statistics
import sys
import time
from typing import Callable, Sequence

__all__ = ["Sweep", "QUICK", "DEFAULT", "counts_for", "permute_indices_loop", "run", "format_report", "iter_ratios",
           "main"]

ALIGN = 8
"""Alignment of each expert's rows in the permute cells (what grouped GEMM kernels want)."""
HIDDEN = 128
"""Row width of the dispatch cells (float32)."""
LOCAL_EXPERTS = 4
"""Local experts per rank in the dispatch cells (``R * 4`` global experts)."""
_BACKENDS = ("torch", "mindspore")
_SEED = 1234


class Sweep:
    """The cells one run measures.

    Args:
        permute_tokens: rows received, ``T``, of the permute cells.
        permute_layouts: ``(R, E)`` pairs of the permute cells.
        dispatch_nprocs: numbers of processes of the dispatch cells (the first ranks of one world).
        dispatch_tokens: rows each rank routes in the dispatch cells.
        max_repeats: repeats per cell (fewer for slow cells, never under 3).
        cell_budget_s: time a cell's repeats aim for.
    """

    def __init__(self, permute_tokens: Sequence[int], permute_layouts: Sequence[tuple[int, int]],
                 dispatch_nprocs: Sequence[int], dispatch_tokens: Sequence[int], max_repeats: int,
                 cell_budget_s: float):
        self.permute_tokens, self.permute_layouts = tuple(permute_tokens), tuple(permute_layouts)
        self.dispatch_nprocs, self.dispatch_tokens = tuple(dispatch_nprocs), tuple(dispatch_tokens)
        self.max_repeats, self.cell_budget_s = max_repeats, cell_budget_s

    def permute_cells(self) -> list[tuple[int, int, int]]:
        return [(t, r, e) for (r, e) in self.permute_layouts for t in self.permute_tokens]


DEFAULT = Sweep(permute_tokens=(1024, 8192, 65536), permute_layouts=((2, 4), (4, 8), (8, 16)),
                dispatch_nprocs=(2, 4), dispatch_tokens=(1024, 4096, 16384), max_repeats=7, cell_budget_s=1.5)
"""The default sweep (about 3 minutes on 2 cores with both backends)."""
QUICK = Sweep(permute_tokens=(1024, 8192), permute_layouts=((2, 4), (4, 8)),
              dispatch_nprocs=(2,), dispatch_tokens=(512, 2048), max_repeats=3, cell_budget_s=0.3)
"""``--quick``: a small sweep for tests and smoke runs."""


# ---------------------------------------------------------------------------------------------- cell inputs
def counts_for(num_rows: int, num_blocks: int, seed: int) -> list[int]:
    """``num_blocks`` seeded, uneven, non-negative counts summing to ``num_rows`` (a skewed router's output)."""
    rng = random.Random(seed)
    weights = [rng.random() ** 2 + 0.05 for _ in range(num_blocks)]
    total = sum(weights)
    counts = [int(num_rows * w / total) for w in weights]
    counts[max(range(num_blocks), key=weights.__getitem__)] += num_rows - sum(counts)
    return counts


def permute_indices_loop(host_counts_RE: Sequence[int], num_ranks: int, num_local_experts: int, align: int = 1):
    """The expert-major slot -> rank-major row map (``source_row_P``), built with a per-(expert, rank) loop.

    The reference the vectorized build is measured against: the shape of torchtitan's CPU ``fill_indices_cpu``
    (one ``arange`` written into a slice per (expert, rank) block), on the platform's tensors, with the counts
    given as host ints like the vectorized build gets them. Padding slots hold ``T`` (the appended zero row), as in
    :class:`~hyper_parallel.expert_parallel.permute.PermuteIndices`.
    """
    from hyper_parallel._select import get_platform
    from hyper_parallel.expert_parallel.permute import aligned_counts

    p = get_platform()
    R, E = num_ranks, num_local_experts
    counts = [int(c) for c in host_counts_RE]
    per_expert = aligned_counts([sum(counts[e::E]) for e in range(E)], align)
    T = sum(counts)
    src_start = [0] * (R * E)
    for i in range(1, R * E):
        src_start[i] = src_start[i - 1] + counts[i - 1]
    out = p.zeros((sum(per_expert),), dtype="int64") + T
    write = 0
    for e in range(E):
        w = write
        for r in range(R):
            n = counts[r * E + e]
            if n:
                out[w:w + n] = p.arange(n) + src_start[r * E + e]
            w += n
        write += per_expert[e]
    return out


# ---------------------------------------------------------------------------------------------- timing
def _measure(fns: dict, warm_s: dict, sweep_args: dict, barrier: Callable | None = None) -> dict:
    """Per-call seconds of each repeat of every function in ``fns``, the functions' repeats interleaved (so a change
    of background load hits them alike). Each repeat times a batch of calls of about 5 ms or more (sized from the
    warm-up time ``warm_s[name]``), then waits for the last result; the number of repeats keeps the cell near its
    budget, between 3 and ``max_repeats``. With ``barrier``, every batch starts at a barrier (all ranks must plan
    from the same ``warm_s``)."""
    warm_s = {k: max(v, 1e-6) for k, v in warm_s.items()}
    number = {k: max(1, min(50, int(0.005 / w))) for k, w in warm_s.items()}
    round_s = sum(warm_s[k] * number[k] for k in fns)
    repeats = max(3, min(sweep_args["max_repeats"], int(sweep_args["cell_budget_s"] / round_s)))
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if barrier is not None:
                barrier()
            t0 = time.perf_counter()
            for _ in range(number[name]):
                out = fn()
            _sync_last(out)
            times[name].append((time.perf_counter() - t0) / number[name])
    return times


def _timed_once(fn: Callable) -> float:
    t0 = time.perf_counter()
    _sync_last(fn())
    return time.perf_counter() - t0


def _sync_last(x) -> None:
    """Wait for ``x`` (frameworks that queue ops, as MindSpore's PyNative may, finish them in order)."""
    from hyper_parallel._select import get_platform

    get_platform().tolist(x.reshape(-1)[-1:])


# ---------------------------------------------------------------------------------------------- cells (in workers)
def _permute_cell(tokens: int, ranks: int, experts: int, sweep_args: dict) -> dict | None:
    """One permute cell on rank 0 of a world (the others return at once)."""
    from hyper_parallel._select import get_platform
    from hyper_parallel.expert_parallel.permute import build_permute_indices

    p = get_platform()
    if p.get_rank() != 0:
        return None
    host = counts_for(tokens, ranks * experts, _SEED + tokens + 7 * ranks + experts)
    dev = p.tensor(host, dtype="int64")
    vec = lambda: build_permute_indices(dev, host, ranks, experts, align=ALIGN).source_row_P  # noqa: E731
    loop = lambda: permute_indices_loop(host, ranks, experts, ALIGN)  # noqa: E731
    fns = {"vectorized": vec, "loop": loop}
    warm, got = {}, {}
    for name, fn in fns.items():  # warm-up, timed for the plan, and checked: both build the same indices
        t0 = time.perf_counter()
        got[name] = p.tolist(fn())
        warm[name] = time.perf_counter() - t0
    if got["vectorized"] != got["loop"]:
        raise AssertionError(f"vectorized and loop permutations differ at T={tokens} R={ranks} E={experts}")
    return _measure(fns, warm, sweep_args)


_GROUPS: dict = {}


def _dispatch_cell(nproc: int, tokens: int, sweep_args: dict) -> dict | None:
    """One dispatch cell on the first ``nproc`` ranks of a world (the others return at once): per-repeat seconds
    of dispatch+combine and of the raw exchange."""
    from hyper_parallel._select import get_platform
    from hyper_parallel.expert_parallel.dispatch import token_combine, token_dispatch

    p = get_platform()
    if nproc not in _GROUPS:  # every rank of the world creates the group, once per process
        _GROUPS[nproc] = p.new_group(range(nproc))
    group = _GROUPS[nproc]
    rank = p.get_rank()
    if rank >= nproc:
        return None
    R, E = nproc, LOCAL_EXPERTS
    counts = [counts_for(tokens, R * E, _SEED + 31 * r + tokens) for r in range(R)]
    splits = [[sum(c[j * E:(j + 1) * E]) for j in range(R)] for c in counts]  # splits[src][dst]
    in_splits = splits[rank]
    out_splits = [splits[src][rank] for src in range(R)]
    x = (p.arange(tokens * HIDDEN, dtype="float32") * (1.0 / 1024)).reshape(tokens, HIDDEN)
    counts_dev = p.tensor(counts[rank], dtype="int64")

    def dispatch_combine():
        d = token_dispatch(x, counts_dev, group, align=1)
        return token_combine(d.routed_input, d.meta)

    def raw():
        y, _ = p.all_to_all_single(x, None, in_splits, out_splits, group=group)
        return p.all_to_all_single(y, None, out_splits, in_splits, group=group)[0]

    back = dispatch_combine()  # warm-up and check: the rows come back where they started
    err = p.tolist((back - x).abs().max().reshape(1))[0]
    if err != 0:
        raise AssertionError(f"dispatch+combine did not return the rows unchanged (max abs diff {err})")
    fns = {"dispatch_combine": dispatch_combine, "raw_all_to_all": raw}
    warm = [_timed_once(fn) for fn in fns.values()]
    # every rank must issue the same collectives: all plan from the slowest rank's warm-up times
    warm = p.tolist(p.all_reduce(p.tensor(warm, dtype="float32"), "max", group=group))
    return _measure(fns, dict(zip(fns, warm)), sweep_args, barrier=lambda: p.barrier(group))


def _versions() -> dict:
    from hyper_parallel._select import get_platform

    return get_platform().versions()


# ---------------------------------------------------------------------------------------------- driver (parent)
class _Progress:
    """One line per step on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        line = f"bench [{self.done:>3}/{self.total}] {time.monotonic() - self.t0:6.1f}s  {label}"
        self.stream.write(f"\r{line:<100}" if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def _median(times: Sequence[float]) -> float:
    return statistics.median(times)


def _max_over_ranks(per_rank: list[list[float]]) -> list[float]:
    return [max(ts) for ts in zip(*per_rank)]


def run(backends: Sequence[str], sweep: Sweep, progress: bool = True) -> dict:
    """Measure every cell of ``sweep`` on each backend; return the report (see :func:`format_report`)."""
    from hyper_parallel.testing import World
    world_size = max([2, *sweep.dispatch_nprocs])
    steps = len(backends) * (1 + len(sweep.permute_cells())
                             + len(sweep.dispatch_nprocs) * len(sweep.dispatch_tokens))
    bar = _Progress(steps, progress)
    args = {"max_repeats": sweep.max_repeats, "cell_budget_s": sweep.cell_budget_s}
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
                    res = world.run(_permute_cell, t, r, e, args, timeout_s=600)[0]
                    permute.setdefault((t, r, e), {})[backend] = {k: _median(v) for k, v in res.items()}
                for nproc in sweep.dispatch_nprocs:
                    for t in sweep.dispatch_tokens:
                        bar.step(f"{backend}: dispatch+combine on {nproc} processes, {t} rows/rank")
                        res = world.run(_dispatch_cell, nproc, t, args, timeout_s=600)[:nproc]
                        dispatch.setdefault((nproc, t), {})[backend] = {
                            k: _median(_max_over_ranks([r[k] for r in res])) for k in res[0]}
            finally:
                world.stop()
    finally:
        bar.close()
    report = _report(backends, sweep, permute, dispatch, versions, time.monotonic() - t_start)
    report["meta"]["load_average_1min"] = {"before": load_before, "after": _loadavg()}
    report["meta"]["omp_num_threads_per_rank"] = threads
    return report


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


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _report(backends, sweep, permute, dispatch, versions, elapsed_s) -> dict:
    both = all(b in backends for b in _BACKENDS)
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


def _fmt_s(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_r(r: float) -> str:
    return f"{r:.2f}" if r < 100 else f"{r:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *(line(r) for r in rows)])


_SHORT = {"torch": "torch", "mindspore": "ms"}


def format_report(report: dict) -> str:
    """The report as two Markdown tables (pipes and dashes: readable in a terminal, pasteable into docs)."""
    backends = report["meta"]["backends"]
    both = all(b in backends for b in _BACKENDS)
    out = []
    header = ["T rows", "RxE"]
    for b in backends:
        header += [f"{_SHORT[b]} vectorized", f"{_SHORT[b]} loop", f"{_SHORT[b]} loop/vec"]
    if both:
        header += ["ms/torch vec", "ms/torch loop"]
    rows = []
    for row in report["permute"]:
        cells = [str(row["tokens"]), f"{row['ranks']}x{row['local_experts']}"]
        for b in backends:
            sec = row["seconds"][b]
            cells += [_fmt_s(sec["vectorized"]), _fmt_s(sec["loop"]), _fmt_r(row["ratios"][f"{b}:loop/vectorized"])]
        if both:
            cells += [_fmt_r(row["ratios"]["mindspore/torch:vectorized"]),
                      _fmt_r(row["ratios"]["mindspore/torch:loop"])]
        rows.append(cells)
    out.append(f"Permutation index build, align {ALIGN}: vectorized build_permute_indices vs a per-(expert, rank) "
               f"loop (time per call; loop/vec > 1: the vectorized build is faster)")
    out.append(_table(header, rows))
    header = ["procs", "rows/rank", "MB/rank"]
    for b in backends:
        header += [f"{_SHORT[b]} disp+comb", f"{_SHORT[b]} raw a2a", f"{_SHORT[b]} ratio"]
    if both:
        header += ["ms/torch d+c", "ms/torch raw"]
    rows = []
    for row in report["dispatch"]:
        cells = [str(row["nproc"]), str(row["tokens_per_rank"]), f"{row['bytes_per_rank'] / 2**20:.2f}"]
        for b in backends:
            sec = row["seconds"][b]
            cells += [_fmt_s(sec["dispatch_combine"]), _fmt_s(sec["raw_all_to_all"]),
                      _fmt_r(row["ratios"][f"{b}:dispatch_combine/raw"])]
        if both:
            cells += [_fmt_r(row["ratios"]["mindspore/torch:dispatch_combine"]),
                      _fmt_r(row["ratios"]["mindspore/torch:raw_all_to_all"])]
        rows.append(cells)
    out.append("")
    out.append(f"EP dispatch+combine (token_dispatch + token_combine, {LOCAL_EXPERTS} local experts, hidden {HIDDEN} "
               f"fp32) vs two raw all_to_all_single of the same rows (time per round trip, slowest rank; "
               f"ratio = disp+comb / raw)")
    out.append(_table(header, rows))
    meta = report["meta"]
    out.append("")
    load = meta.get("load_average_1min", {})
    versions = ", ".join(f"{k} {v}" for vs in meta["versions"].values() for k, v in vs.items()
                         if k in ("torch", "mindspore"))
    out.append(f"{meta['machine']}; {versions}; OMP_NUM_THREADS={meta.get('omp_num_threads_per_rank')} per rank; "
               f"{meta['statistic']}; {meta['elapsed_s']} s in all; 1-min load average {load.get('before')} before, "
               f"{load.get('after')} after")
    return "\n".join(out)


def iter_ratios(report: dict):
    """Every ``(section, row index, name, ratio)`` of a report."""
    for section in ("permute", "dispatch"):
        for i, row in enumerate(report[section]):
            for name, value in row["ratios"].items():
                yield section, i, name, value


# ---------------------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hyper-parallel bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small sweep (seconds of work; used by the tests)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends to measure (default: every installed one of torch, mindspore)")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the numbers to PATH as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return ap


def _error(msg: str) -> int:
    print(f"hyper-parallel bench: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; print the tables; return the exit code (2 for bad arguments)."""
    args = _parser().parse_args(argv)
    from hyper_parallel._select import available_backends

    installed = available_backends()
    if args.backends is None:
        backends = [b for b in _BACKENDS if installed.get(b)]
        if not backends:
            return _error("neither torch nor mindspore is installed")
    else:
        backends = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in _BACKENDS]
        if not backends or bad:
            return _error(f"--backends {args.backends!r}: valid backends are {list(_BACKENDS)}")
        missing = [b for b in backends if not installed.get(b)]
        if missing:
            return _error(f"--backends names {missing}, which is not installed")
        backends = [b for b in _BACKENDS if b in backends]  # torch first: the ratios read mindspore / torch
    from hyper_parallel.testing import RankError, WorldTimeout

    try:
        report = run(backends, QUICK if args.quick else DEFAULT, progress=not args.no_progress)
    except (RankError, WorldTimeout) as e:
        print(f"hyper-parallel bench: a benchmark cell failed: {e}", file=sys.stderr)
        return 1
    report["meta"]["command"] = "hyper-parallel bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through the CLI
    # Run the imported module's main, not this __main__ copy: the workers unpickle the cell functions by their
    # module name, hyper_parallel.bench.
    from hyper_parallel import bench as _bench

    sys.exit(_bench.main())
