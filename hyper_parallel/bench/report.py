"""The bench's output: a report as two Markdown tables and a line about the machine, and its ratios one by one.

Markdown (pipes and dashes, drawn by :func:`hyper_parallel._console.format_table`) reads in a terminal and pastes
into the docs (``docs/benchmarks-cpu.md``).
"""

from __future__ import annotations

from hyper_parallel._console import format_table
from hyper_parallel.bench.sweep import ALIGN, BACKENDS, HIDDEN, LOCAL_EXPERTS

__all__ = ["format_report", "iter_ratios"]

_SHORT = {"torch": "torch", "mindspore": "ms"}


def format_report(report: dict) -> str:
    """The report as two Markdown tables (permutation, then dispatch+combine) and a line about the run."""
    backends = report["meta"]["backends"]
    both = all(b in backends for b in BACKENDS)
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
    out = [f"Permutation index build, align {ALIGN}: vectorized build_permute_indices vs a per-(expert, rank) "
           f"loop (time per call; loop/vec > 1: the vectorized build is faster)", _table(header, rows)]

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
    out += ["", f"EP dispatch+combine (token_dispatch + token_combine, {LOCAL_EXPERTS} local experts, hidden "
                f"{HIDDEN} fp32) vs two raw all_to_all_single of the same rows (time per round trip, slowest rank; "
                f"ratio = disp+comb / raw)", _table(header, rows)]

    meta = report["meta"]
    load = meta.get("load_average_1min", {})
    versions = ", ".join(f"{k} {v}" for vs in meta["versions"].values() for k, v in vs.items()
                         if k in ("torch", "mindspore"))
    out += ["", f"{meta['machine']}; {versions}; OMP_NUM_THREADS={meta.get('omp_num_threads_per_rank')} per rank; "
                f"{meta['statistic']}; {meta['elapsed_s']} s in all; 1-min load average {load.get('before')} "
                f"before, {load.get('after')} after"]
    return "\n".join(out)


def iter_ratios(report: dict):
    """Every ``(section, row index, name, ratio)`` of a report."""
    for section in ("permute", "dispatch"):
        for i, row in enumerate(report[section]):
            for name, value in row["ratios"].items():
                yield section, i, name, value


def _table(header: list[str], rows: list[list[str]]) -> str:
    # every column right-aligned: they are numbers, the labels included (T rows, procs)
    return format_table(rows, header, align="r" * len(header), markdown=True)


def _fmt_s(s: float) -> str:
    """Seconds in the unit that reads best: us below 1 ms, ms below 1 s."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_r(r: float) -> str:
    """A ratio: two decimals, none from 100 on (the digits would only be noise)."""
    return f"{r:.2f}" if r < 100 else f"{r:.0f}"
