"""The shipped conformance runner: the whole suite against one backend, one printed line per case.

``python -m hyper_parallel.testing.conformance --backend NAME [--nproc 2 4] [--timeout S]`` or, from Python,
:func:`run_conformance`. ``NAME`` is resolved as ``HYPER_PARALLEL_PLATFORM`` is: a built-in (``torch``,
``torch_npu``, ``mindspore``) or a name registered under the entry-point group ``hyper_parallel.platforms``. For
each world size a :class:`~hyper_parallel.testing.World` of that backend is started once and every case of
:func:`~hyper_parallel.testing.conformance.suite.conformance_cases` runs on it. A case that raises fails with each
failing rank's traceback; one that hangs fails after ``timeout_s`` and the world is restarted for the next case.

This module imports no framework and no numpy; the cases are imported when a run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Iterable
from typing import TextIO

from hyper_parallel import _select
from hyper_parallel.testing.world import RankError, World, WorldTimeout


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """The outcome of one case at one world size: ``status`` is ``"pass"``, ``"fail"`` or ``"skip"``."""

    case: str
    nproc: int
    status: str
    seconds: float = 0.0
    detail: str = ""


@dataclasses.dataclass
class ConformanceReport:
    """What :func:`run_conformance` found: one :class:`CaseResult` per case and world size."""

    backend: str
    nprocs: tuple[int, ...]
    results: list[CaseResult] = dataclasses.field(default_factory=list)
    platforms: dict[int, str] = dataclasses.field(default_factory=dict)
    """Per world size, the platform the ranks ran (``module:Class (name, device, collectives)``)."""
    seconds: float = 0.0

    def _with(self, status: str) -> list[CaseResult]:
        return [r for r in self.results if r.status == status]

    @property
    def passed(self) -> list[CaseResult]:
        return self._with("pass")

    @property
    def failed(self) -> list[CaseResult]:
        return self._with("fail")

    @property
    def skipped(self) -> list[CaseResult]:
        return self._with("skip")

    @property
    def ok(self) -> bool:
        """No case failed and at least one passed."""
        return not self.failed and bool(self.passed)

    def summary(self) -> str:
        """One line: ``NAME: P passed, F failed, S skipped at ranks [..] in T s: OK`` (or ``FAILED``)."""
        return (f"{self.backend}: {len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} skipped "
                f"at ranks {list(self.nprocs)} in {self.seconds:.1f} s: {'OK' if self.ok else 'FAILED'}")


def describe_platform() -> dict:
    """Run on every rank: which platform this rank resolved (its class, name, device and collective library)."""
    from hyper_parallel import get_platform

    p = get_platform()
    cls = type(p)
    return {"name": p.name, "class": f"{cls.__module__}:{cls.__qualname__}", "device_type": p.device_type,
            "dist_backend": p.dist_backend}


def _resolve(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str naming a backend, got {type(backend).__name__}")
    name = backend.strip().lower()
    known = _select.available_backends()
    if name not in known:
        raise ValueError(f"backend {backend!r} is not a known backend; valid values: {sorted(known)} (the built-ins "
                         f"and the names registered under the entry-point group {_select.ENTRY_POINT_GROUP!r})")
    if not known[name]:
        spec = _select.BUILTIN[name]
        raise ValueError(f"backend {name!r} needs the {spec.framework!r} package, which is not installed; "
                         f"fix: {spec.install}")
    return name


def _world_sizes(nprocs, valid: tuple[int, ...]) -> tuple[int, ...]:
    sizes = (nprocs,) if isinstance(nprocs, int) else tuple(nprocs)
    bad_type = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int)]
    if bad_type:
        raise TypeError(f"nprocs must be ints, got {bad_type!r}")
    if not sizes or any(n not in valid for n in sizes):
        raise ValueError(f"nprocs must be world sizes in {list(valid)} (the cases' expected values are exact up to "
                         f"{max(valid)} ranks), got {list(sizes)}")
    return tuple(dict.fromkeys(sizes))


def run_conformance(backend: str, nprocs: int | Iterable[int] = (2, 4), *, timeout_s: float = 120.0,
                    start_timeout_s: float = 180.0, stream: TextIO | None = None) -> ConformanceReport:
    """Run every conformance case on worlds of ``backend`` and print one line per case to ``stream``.

    Args:
        backend: a backend name as ``HYPER_PARALLEL_PLATFORM`` accepts it (case-insensitive), including names
            registered under the entry-point group ``hyper_parallel.platforms``.
        nprocs: the world sizes to run at, each in :data:`~hyper_parallel.testing.conformance.suite.WORLD_SIZES`.
        timeout_s: seconds a case may take on the ranks; past it the case fails and the world is restarted.
        start_timeout_s: seconds a world may take to start.
        stream: where the lines go (default ``sys.stdout``).

    Returns:
        The report; ``report.ok`` is False if any case failed.

    Raises:
        TypeError: ``backend`` is not a str, ``nprocs`` not ints, or a timeout not a number.
        ValueError: unknown or uninstalled backend (the message lists the valid names or the fix), a world size
            outside ``WORLD_SIZES``, or a timeout that is not positive.
    """
    from hyper_parallel.testing.conformance.suite import WORLD_SIZES, conformance_cases

    name = _resolve(backend)
    sizes = _world_sizes(nprocs, WORLD_SIZES)
    for what, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
        if not value > 0:
            raise ValueError(f"{what} must be > 0 seconds, got {value!r}")
    out = sys.stdout if stream is None else stream
    report = ConformanceReport(backend=name, nprocs=sizes)
    cases = conformance_cases()
    started = time.monotonic()

    def record(result: CaseResult) -> None:
        report.results.append(result)
        line = f"{result.status.upper()}  x{result.nproc}  {result.case}"
        if result.status == "skip":
            line += f"  ({result.detail})"
        else:
            line += f"  ({result.seconds:.2f} s)"
            if result.detail:
                line += "\n" + "\n".join("    " + text for text in result.detail.rstrip().splitlines())
        print(line, file=out, flush=True)

    for nproc in sizes:
        world = World(name, nproc, start_timeout_s=start_timeout_s)
        try:
            _run_world(world, name, nproc, cases, timeout_s, report, record, out)
        finally:
            world.stop(graceful=world.alive)
    report.seconds = time.monotonic() - started
    if report.failed:
        print("failed: " + ", ".join(f"{r.case} x{r.nproc}" for r in report.failed), file=out)
    print(report.summary(), file=out, flush=True)
    return report


def _run_world(world: World, name: str, nproc: int, cases: list, timeout_s: float, report: ConformanceReport,
               record, out: TextIO) -> None:
    """Start ``world``, describe its platform, run every case on it (restarting it after a dead or hung case)."""
    t0 = time.monotonic()
    try:
        world.start()
        info = world.run(describe_platform, timeout_s=timeout_s)[0]
    except (AssertionError, EOFError, OSError) as err:  # RankError and WorldTimeout are AssertionErrors
        record(CaseResult("world/start", nproc, "fail", time.monotonic() - t0, f"{type(err).__name__}: {err}"))
        return
    report.platforms[nproc] = f"{info['class']} ({info['name']!r}, {info['device_type']}, {info['dist_backend']})"
    print(f"backend {name!r} at {nproc} ranks: {report.platforms[nproc]}", file=out, flush=True)
    if info["name"] != name:
        record(CaseResult("platform/name", nproc, "fail", 0.0,
                          f"Platform.name is {info['name']!r} but the platform was selected as {name!r}; name must "
                          "spell the backend as HYPER_PARALLEL_PLATFORM (the entry point's name) does"))
    for index, case in enumerate(cases):
        if not case.runs_at(nproc):
            record(CaseResult(case.name, nproc, "skip", detail=f"runs at {list(case.world_sizes)} ranks only"))
            continue
        t0 = time.monotonic()
        try:
            case.run(world, timeout_s=timeout_s)
        except (RankError, WorldTimeout) as err:
            record(CaseResult(case.name, nproc, "fail", time.monotonic() - t0, str(err)))
        except Exception:  # noqa: BLE001 - a check that failed in this process, or a case that could not be sent
            record(CaseResult(case.name, nproc, "fail", time.monotonic() - t0, traceback.format_exc()))
        else:
            record(CaseResult(case.name, nproc, "pass", time.monotonic() - t0))
            continue
        if not world.alive:  # a rank died or hung: start afresh here, once, rather than in every later case
            t0 = time.monotonic()
            try:
                world.stop(graceful=False)
                world.start()
            except (AssertionError, EOFError, OSError) as err:
                left = len(cases) - index - 1
                record(CaseResult("world/restart", nproc, "fail", time.monotonic() - t0,
                                  f"{left} cases not run: {err}"))
                return


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 if every case passed, 1 if any failed, 2 for a bad argument."""
    parser = argparse.ArgumentParser(
        prog="python -m hyper_parallel.testing.conformance",
        description="Run the hyper_parallel platform conformance suite against one backend.")
    parser.add_argument("--backend", required=True,
                        help="backend name as HYPER_PARALLEL_PLATFORM takes it, incl. entry-point-registered ones")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="world sizes to run at (default: 2 4)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a case may take before it fails and the world is restarted (default: 120)")
    parser.add_argument("--start-timeout", type=float, default=180.0,
                        help="seconds a world may take to start (default: 180)")
    args = parser.parse_args(argv)
    try:
        report = run_conformance(args.backend, args.nproc, timeout_s=args.timeout,
                                 start_timeout_s=args.start_timeout)
    except (TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1
