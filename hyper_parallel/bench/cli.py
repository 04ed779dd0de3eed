"""``hyper-parallel bench``'s command line: the options, the backends they name, the exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hyper_parallel.bench.compare import run
from hyper_parallel.bench.report import format_report
from hyper_parallel.bench.soak import DEFAULT_TIMEOUT_S, FULL, GROWTH_BOUND_MIB_PER_STEP
from hyper_parallel.bench.soak import QUICK as SOAK_QUICK
from hyper_parallel.bench.sweep import BACKENDS, DEFAULT, QUICK

__all__ = ["main"]

DESCRIPTION = ("CPU benchmarks: ``hyper-parallel bench`` (also ``python -m hyper_parallel.bench``); with --soak, the "
               "soak: memory and loss over a long training run.")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hyper-parallel bench", description=DESCRIPTION)
    ap.add_argument("--quick", action="store_true",
                    help="a small sweep (seconds of work; used by the tests); with --soak, the test suite's soak "
                         "(40 steps, a one-layer model)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends to measure (default: every installed one of torch, mindspore)")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the numbers to PATH as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    soak = ap.add_argument_group("soak", "instead of the timing sweep, train the demo's model for --steps steps on "
                                 "--nproc processes and on one process per backend, sample every process's resident "
                                 "memory at step 1, steps/2 and steps, and check that it stays flat and that the "
                                 "losses agree (exit 1 otherwise)")
    soak.add_argument("--soak", action="store_true", help="run the soak")
    soak.add_argument("--steps", type=int, default=None,
                      help=f"training steps, at least 2 (default {FULL.steps}; {SOAK_QUICK.steps} with --quick)")
    soak.add_argument("--nproc", type=int, default=None,
                      help=f"processes of the parallel run (default {FULL.nproc}), laid out as the demo does")
    soak.add_argument("--max-growth", type=float, default=None, metavar="MIB_PER_STEP",
                      help="largest RSS growth per step allowed on any process between the middle and the last "
                           "sample (default per backend: " + ", ".join(f"{b} {v}" for b, v in
                                                                      GROWTH_BOUND_MIB_PER_STEP.items()) + ")")
    soak.add_argument("--timeout", type=float, default=None,
                      help=f"seconds allowed for each run before every rank is stopped (default "
                           f"{DEFAULT_TIMEOUT_S:g})")
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
    """Run the benchmarks (with ``--soak``, the soak); print the tables; return the exit code (2 for bad arguments,
    1 for a failed cell, a failed soak run or a soak check that does not hold)."""
    args = _parser().parse_args(argv)
    if not args.soak:
        given = [flag for flag in ("steps", "nproc", "max_growth", "timeout") if getattr(args, flag) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            return _error(f"{flag} applies to --soak only (the timing sweep has fixed sizes); add --soak or leave "
                          f"it out")
    backends, problem = _backends(args.backends)
    if problem:
        return _error(problem)
    if args.soak:
        return _soak(args, backends, argv)
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


def _soak(args: argparse.Namespace, backends: list[str], argv: Sequence[str] | None) -> int:
    """``--soak``: run it, print its table and verdict; 0 when every check holds, 1 otherwise, 2 for bad sizes."""
    import dataclasses

    from hyper_parallel.bench import soak
    from hyper_parallel.demo.config import DemoInputError

    base = SOAK_QUICK if args.quick else FULL
    size = dataclasses.replace(base, steps=base.steps if args.steps is None else args.steps,
                               nproc=base.nproc if args.nproc is None else args.nproc)
    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    if not timeout > 0 or timeout == float("inf"):
        return _error(f"--timeout {timeout:g} is not allowed: it must be a positive, finite number of seconds")
    if args.max_growth is not None and not 0 <= args.max_growth < float("inf"):
        return _error(f"--max-growth {args.max_growth:g} is not allowed: it must be a finite number of MiB per step, "
                      f"0 or more")
    try:
        soak.plan(backends, size)  # every size check, before anything is launched
        report = soak.run(backends, size, timeout_s=timeout, progress=not args.no_progress,
                          max_growth_mib_per_step=args.max_growth)
    except DemoInputError as e:
        return _error(str(e))
    except soak.RunFailed as e:
        print(f"hyper-parallel bench: the soak failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the launcher has stopped every rank on its way out
        print("\nhyper-parallel bench: soak interrupted; every rank was stopped", file=sys.stderr)
        return 130
    report["meta"]["command"] = "hyper-parallel bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(soak.format_soak(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if not report["ok"]:
        print("hyper-parallel bench: FAILED: the soak's memory grew or its loss left the single-process run's "
              "(see above)", file=sys.stderr)
        return 1
    return 0
