"""``hyper-parallel bench``'s command line: the options, the backends they name, the exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hyper_parallel.bench.compare import run
from hyper_parallel.bench.report import format_report
from hyper_parallel.bench.sweep import BACKENDS, DEFAULT, QUICK

__all__ = ["main"]

DESCRIPTION = "CPU benchmarks: ``hyper-parallel bench`` (also ``python -m hyper_parallel.bench``)."


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hyper-parallel bench", description=DESCRIPTION)
    ap.add_argument("--quick", action="store_true", help="a small sweep (seconds of work; used by the tests)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends to measure (default: every installed one of torch, mindspore)")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the numbers to PATH as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return ap


def _error(msg: str) -> int:
    print(f"hyper-parallel bench: error: {msg}", file=sys.stderr)
    return 2


def _backends(option: str | None) -> tuple[list[str], str | None]:
    """The backends to measure, torch first (the ratios read mindspore / torch), or an error message."""
    from hyper_parallel._select import available_backends

    installed = available_backends()
    if option is None:
        backends = [b for b in BACKENDS if installed.get(b)]
        return backends, None if backends else "neither torch nor mindspore is installed"
    named = [b.strip().lower() for b in option.split(",") if b.strip()]
    if not named or [b for b in named if b not in BACKENDS]:
        return [], f"--backends {option!r}: valid backends are {list(BACKENDS)}"
    missing = [b for b in named if not installed.get(b)]
    if missing:
        return [], f"--backends names {missing}, which is not installed"
    return [b for b in BACKENDS if b in named], None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; print the tables; return the exit code (2 for bad arguments, 1 for a failed cell)."""
    args = _parser().parse_args(argv)
    backends, problem = _backends(args.backends)
    if problem:
        return _error(problem)
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
