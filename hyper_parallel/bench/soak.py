"""``hyper-parallel bench --soak``: the demo's model trained for many steps on N local processes, per backend, with
every rank's resident memory sampled along the way, next to a single-process run of the same job.

Each backend trains the demo's job (:mod:`hyper_parallel.demo`: same seed, same global batches, the layout the demo
picks for ``--nproc``) twice, through the demo's own driver and launcher: in parallel on ``nproc`` processes, and on
one process (the reference). After steps ``1``, ``steps / 2`` and ``steps`` every process reports its current
resident set size (RSS, not its peak). The verdict, per backend:

* **memory**: on every process of both runs, the RSS growth from the middle sample to the last one, per step, is at
  most the backend's bound (:data:`GROWTH_BOUND_MIB_PER_STEP`, or ``--max-growth``). The first half is reported but
  not bounded: it holds the warm-up (allocator pools, kernels built for new shapes as the routing shifts), which
  levels off; a leak does not.
* **loss**: the parallel run's loss equals the single-process run's within the demo's parity tolerance
  (:data:`hyper_parallel.demo.config.PARITY_ABS_TOL`) at every step, the last one included, while both runs route
  alike; a routing difference is accepted only at a recorded tie (see
  :func:`hyper_parallel.demo.driver.loss_parity`), and the steps after it are reported, not bounded.

Run it as ``hyper-parallel bench --soak`` (or ``python -m hyper_parallel.bench --soak``); ``--quick`` is the test
suite's size. Exit codes: 0 when both hold on every backend, 1 when a check fails or a run
fails (its output is shown), 2 for bad options.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
import time
from collections.abc import Sequence

from hyper_parallel._console import format_table
from hyper_parallel.demo import config as C
from hyper_parallel.demo.driver import loss_parity, parity_words

__all__ = ["SoakSize", "FULL", "QUICK", "NOISE_MIB_PER_STEP", "GROWTH_BOUND_MIB_PER_STEP", "RunFailed",
           "sample_steps", "plan", "run", "evaluate", "format_soak"]

#: RSS growth per step (MiB) that is noise: torch's processes, whose memory levels off, stay under it at both sizes.
NOISE_MIB_PER_STEP = 0.1

#: Largest allowed RSS growth per step (MiB), per backend, of any process between the middle and the last sample.
#: Measured on 2 CPU cores (torch 2.13, MindSpore 2.10; docs/benchmarks-cpu.md, "Soak"), full size: torch at most
#: +0.02 MiB/step (noise); MindSpore +0.24 to +0.25 MiB/step per rank, steadily: MindSpore 2.10 keeps a few KB per
#: call of some ops (reductions, 2-D matmul, top-k) for good (docs/failure_modes.md, "Memory"), bounded here with a
#: margin so a regression still fails (the leak the soak was written for grew 1.65 MiB/step per rank).
GROWTH_BOUND_MIB_PER_STEP = {"torch": NOISE_MIB_PER_STEP, "mindspore": 0.4}

#: Seconds allowed for each run (parallel or reference) of a soak, unless ``--timeout`` says otherwise.
DEFAULT_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class SoakSize:
    """How big a soak is: steps, processes of the parallel run, and the demo model."""

    steps: int
    nproc: int
    model: C.ModelConfig


#: The soak of issue 11: the demo's default model, 200 steps, 4 processes (ExpertTensorParallel 2x2).
FULL = SoakSize(steps=200, nproc=4, model=C.ModelConfig())
#: The test suite's soak: 40 steps, 4 processes, one MoE layer on 128 tokens per step (under a minute per backend
#: on 2 CPU cores).
QUICK = SoakSize(steps=40, nproc=4, model=C.ModelConfig(tokens=128, layers=1))


def sample_steps(steps: int) -> tuple[int, ...]:
    """The 1-based steps after which every process reports its RSS: ``1``, ``steps // 2`` and ``steps``.

    Raises:
        ValueError: ``steps`` under 2 (a growth needs two samples).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"a soak needs at least 2 steps (memory is compared between samples), got {steps!r}")
    return tuple(sorted({1, steps // 2, steps}))


def plan(backends: Sequence[str], size: SoakSize) -> list[tuple[str, C.RunSpec]]:
    """The runs of a soak, in order: ``("parallel", spec)`` then ``("reference", spec)`` per backend.

    Raises:
        hyper_parallel.demo.config.DemoInputError: (a ``ValueError``) fewer than 2 steps, or ``nproc`` that is not
            positive or whose layout does not fit the model (the demo's checks, naming the value and the constraint).
    """
    if size.steps < 2:
        raise C.DemoInputError(f"--steps {size.steps} is not allowed: a soak needs at least 2 steps (memory is "
                               f"compared between samples)")
    dp, ep, tp = C.resolve_layout(size.nproc, None, None)
    try:
        C.check_model(size.model, ep, tp, size.steps, dp)
    except C.DemoInputError as e:
        raise C.DemoInputError(f"--nproc {size.nproc} does not fit the soak's model: the demo lays {size.nproc} "
                               f"processes out as dp {dp} x ep {ep} x tp {tp}, and {e}") from None
    memory = sample_steps(size.steps)
    runs = []
    for b in backends:
        runs.append(("parallel", C.RunSpec(backend=b, nproc=size.nproc, ep=ep, tp=tp, steps=size.steps,
                                           model=size.model, memory_steps=memory, dp=dp)))
        runs.append(("reference", C.RunSpec(backend=b, nproc=1, ep=1, tp=1, steps=size.steps, model=size.model,
                                            memory_steps=memory)))
    return runs


def run(backends: Sequence[str], size: SoakSize, timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = True,
        max_growth_mib_per_step: float | None = None) -> dict:
    """Run the soak on each backend; return its report (:func:`evaluate` of the runs).

    ``max_growth_mib_per_step`` replaces every backend's growth bound (:data:`GROWTH_BOUND_MIB_PER_STEP`).

    Every run goes through the demo's driver and the project launcher, bounded by ``timeout_s`` (every rank is
    stopped when it passes), and shows a progress bar on stderr unless ``progress`` is False.

    Raises:
        hyper_parallel.demo.config.DemoInputError: the size does not fit the demo (see :func:`plan`).
        RunFailed: a run failed or timed out (its exit code in ``.code``; its output was shown on stderr).
    """
    from hyper_parallel.demo import driver

    runs = plan(backends, size)
    results: dict = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hyper-parallel-soak-") as logs:  # MindSpore's own logs (glog)
        for kind, spec in runs:
            try:
                results[f"{spec.backend}/{kind}"] = driver.run_one(spec, kind, logs, timeout_s, progress=progress)
            except driver._RunFailed as e:
                raise RunFailed(str(e), e.code) from None
    bounds = None if max_growth_mib_per_step is None else {b: max_growth_mib_per_step for b in backends}
    report = evaluate(runs, results, bounds)
    report["meta"].update(date=datetime.date.today().isoformat(), elapsed_s=round(time.monotonic() - t0, 1),
                          timeout_s=timeout_s, versions=_versions(backends), machine=_machine())
    return report


class RunFailed(RuntimeError):
    """A soak run failed or timed out; ``code`` is its exit code (124: the timeout)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def evaluate(runs: list[tuple[str, C.RunSpec]], results: dict, bounds: dict | None = None) -> dict:
    """The soak's report: per backend, every process's RSS samples, its growth, the losses and the verdict.

    Args:
        runs: the runs, as :func:`plan` returns them.
        results: ``{"backend/kind": result}``, each as :func:`hyper_parallel.demo.driver.run_one` returns it (the
            ``losses`` per step and the ``memory`` records of every rank).
        bounds: ``{backend: MiB per step}``, the growth bounds; default :data:`GROWTH_BOUND_MIB_PER_STEP`.

    Raises:
        ValueError: a run is missing a process's sample (the report would compare nothing), or a backend has no
            growth bound.
    """
    bounds = GROWTH_BOUND_MIB_PER_STEP if bounds is None else bounds
    missing = sorted({spec.backend for _, spec in runs} - set(bounds))
    if missing:
        raise ValueError(f"no memory growth bound for backend {missing}: bounds are given for {sorted(bounds)}")
    par_spec = runs[0][1]
    samples = par_spec.memory_steps
    mid, last = samples[-2], samples[-1]
    report: dict = {
        "meta": {"steps": par_spec.steps, "nproc": par_spec.nproc, "layout": par_spec.layout,
                 "style": par_spec.style, "model": dataclasses.asdict(par_spec.model), "sample_steps": list(samples),
                 "noise_mib_per_step": NOISE_MIB_PER_STEP, "loss_tolerance": C.PARITY_ABS_TOL},
        "backends": {},
    }
    for kind, spec in runs:
        res = results[f"{spec.backend}/{kind}"]
        bound = bounds[spec.backend]
        rows = []
        for rank in range(spec.nproc):
            rss = {r["step"]: r["rss_mib"] for r in res["memory"] if r["rank"] == rank}
            missing = [s for s in samples if s not in rss]
            if missing:
                raise ValueError(f"the {spec.backend} {kind} run has no memory sample of rank {rank} at steps "
                                 f"{missing} (expected one at each of {list(samples)})")
            per_step = (rss[last] - rss[mid]) / (last - mid)
            rows.append({"rank": rank, "rss_mib": {str(s): rss[s] for s in samples},
                         "kind": next(r["kind"] for r in res["memory"] if r["rank"] == rank),
                         "growth_mib": rss[last] - rss[samples[0]], "late_growth_mib": rss[last] - rss[mid],
                         "late_mib_per_step": per_step, "ok": per_step <= bound})
        b = report["backends"].setdefault(spec.backend, {"runs": {}, "growth_bound_mib_per_step": bound})
        b["runs"][kind] = {"nproc": spec.nproc, "layout": spec.layout, "wall_s": res["wall_s"],
                           "last_loss": res["last_loss"], "losses": res["losses"], "processes": rows,
                           "load": res["load"], "routing_margin": res.get("routing_margin")}
    for b in report["backends"].values():
        par, ref = b["runs"]["parallel"], b["runs"]["reference"]
        parity = loss_parity(par, ref)  # a NaN loss fails, wherever it is
        b["loss"] = {"parallel": par["last_loss"], "reference": ref["last_loss"],
                     "abs_diff": parity["per_step_abs_diff"][-1], **parity}
        b["memory_ok"] = all(p["ok"] for r in b["runs"].values() for p in r["processes"])
        b["ok"] = b["memory_ok"] and b["loss"]["ok"]
    report["ok"] = all(b["ok"] for b in report["backends"].values())
    return report


def format_soak(report: dict) -> str:
    """The report as a Markdown table (a row per process; its memory ``flat``, ``residual`` or ``GROWS``, see
    :func:`_memory_word`) and two verdict lines per backend (loss, memory)."""
    meta = report["meta"]
    samples = meta["sample_steps"]
    first, mid, last = samples[0], samples[-2], samples[-1]
    m = meta["model"]
    out = [f"Soak: the demo's model ({m['layers']} MoE layers x {m['experts']} experts, {m['tokens']} tokens/step), "
           f"{meta['steps']} steps, {meta['layout']} on {meta['nproc']} processes and the single-process reference; "
           f"resident memory (current RSS, MiB) of every process after steps {', '.join(map(str, samples))}"]
    header = ["backend", "run", "rank", *(f"RSS @{s}" for s in samples), f"growth {first}->{last}",
              f"MiB/step {mid}->{last}", "memory"]
    rows = []
    for backend, b in report["backends"].items():
        for kind, r in b["runs"].items():
            for p in r["processes"]:
                rows.append([backend, kind, str(p["rank"]), *(f"{p['rss_mib'][str(s)]:.1f}" for s in samples),
                             f"{p['growth_mib']:+.1f}", f"{p['late_mib_per_step']:+.3f}",
                             _memory_word(p, meta["noise_mib_per_step"])])
    out.append(format_table(rows, header, align="llr" + "r" * len(samples) + "rrl", markdown=True))
    out.append("")
    for backend, b in report["backends"].items():
        loss = b["loss"]
        worst = max(p["late_mib_per_step"] for r in b["runs"].values() for p in r["processes"])
        out.append(f"{backend} loss at step {last}: parallel {loss['parallel']:.8f}, single process "
                   f"{loss['reference']:.8f}, |diff| {loss['abs_diff']:.2e} ({parity_words(loss, meta['steps'])}): "
                   f"{'OK' if loss['ok'] else 'FAILED'}")
        bound, noise = b["growth_bound_mib_per_step"], meta["noise_mib_per_step"]
        note = "" if bound <= noise else f"; above the noise ({noise} MiB/step) is this backend's known residual"
        out.append(f"{backend} memory: largest growth {worst:+.3f} MiB/step over steps {mid}->{last} of any process "
                   f"(limit {bound} MiB/step{note}): {'OK' if b['memory_ok'] else 'FAILED'}")
    if "elapsed_s" in meta:
        versions = ", ".join(f"{k} {v}" for vs in meta.get("versions", {}).values() for k, v in vs.items())
        out.append(f"{meta['machine']}; {versions}; {meta['elapsed_s']} s in all")
    return "\n".join(out)


def _memory_word(process: dict, noise: float) -> str:
    """A process's memory column: ``flat`` (growth within the noise), ``residual`` (above the noise, within its
    backend's bound) or ``GROWS`` (past the bound: the check fails)."""
    if not process["ok"]:
        return "GROWS"
    return "flat" if process["late_mib_per_step"] <= noise else "residual"


def _machine() -> str:
    from hyper_parallel.bench.compare import _cpu_model

    return f"{_cpu_model()}, {os.cpu_count()} CPU cores"


def _versions(backends: Sequence[str]) -> dict:
    """The framework versions, from the installed distributions (this process imports no framework)."""
    import importlib.metadata

    out = {}
    for b in backends:
        try:
            out[b] = {b: importlib.metadata.version(b)}
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a run needed it installed
            out[b] = {}
    return out
