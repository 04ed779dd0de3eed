"""``hyper-parallel bench --soak``: the demo's model trained on 4 processes and on one, with every process's resident
memory sampled at the first, middle and last step (issue 11, item 6). The suite runs the reduced size (``--quick``:
40 steps, 4 processes, one MoE layer) per backend; the full size (200 steps, the demo's model) is measured in
docs/benchmarks-cpu.md. Also in-process: the verdict (a growing process, a loss off the reference), the records the
ranks print, and every bad option (exit 2, one line, nothing launched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hyper_parallel import bench
from hyper_parallel.bench import soak
from hyper_parallel.demo import config as C
from hyper_parallel.demo import report
from hyper_parallel.demo.train import RECORD_PREFIX, resident_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Growth bound (MiB per step, between steps 20 and 40 of the quick soak) asserted here, per backend. Measured on 2 CPU
#: cores (torch 2.13, MindSpore 2.10), every process of 4 runs on torch and 5 on MindSpore: torch +0.001 to +0.030
#: MiB/step (its memory levels off); MindSpore +0.109 to +0.213 MiB/step (the residual growth of its eager execution
#: of the MoE layer, see docs/failure_modes.md). 0.4 stays below the 0.72 MiB/step that the per-expert-slice kernels
#: leaked on one such layer (tests/test_mindspore_modes.py).
QUICK_BOUND_MIB_PER_STEP = {"torch": 0.1, "mindspore": 0.4}
#: Seconds the quick soak may take per backend before the test fails (measured 12-25 s on torch, 25-39 s on MindSpore,
#: 2 CPU cores).
QUICK_TIMEOUT_S = 240


def _env() -> dict:
    env = dict(os.environ)
    env.pop("HYPER_PARALLEL_PLATFORM", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_bench(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyper_parallel", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


@pytest.mark.backends("torch", "mindspore")
def test_quick_soak_memory_stays_flat_and_loss_matches_one_process(backend, tmp_path):
    bound = QUICK_BOUND_MIB_PER_STEP[backend]
    out = tmp_path / "soak.json"
    t0 = time.monotonic()
    r = run_bench(["--soak", "--quick", "--backends", backend, "--max-growth", str(bound), "--json", str(out)],
                  timeout=QUICK_TIMEOUT_S)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    steps = soak.QUICK.steps
    assert rep["meta"]["sample_steps"] == [1, steps // 2, steps] and rep["meta"]["nproc"] == 4
    assert rep["meta"]["layout"] == "dp 2 x EP 2" and rep["ok"] is True
    b = rep["backends"][backend]
    procs = {kind: run["processes"] for kind, run in b["runs"].items()}
    assert [p["rank"] for p in procs["parallel"]] == [0, 1, 2, 3] and [p["rank"] for p in procs["reference"]] == [0]
    growth = {f"{kind} rank {p['rank']}": round(p["late_mib_per_step"], 3) for kind in procs for p in procs[kind]}
    for kind in procs:
        for p in procs[kind]:
            assert p["kind"] == "current" and set(p["rss_mib"]) == {"1", str(steps // 2), str(steps)}
            assert 50 < p["rss_mib"]["1"] < 4096, p  # a resident size in MiB, not pages or bytes
            late = p["rss_mib"][str(steps)] - p["rss_mib"][str(steps // 2)]
            assert p["late_mib_per_step"] == pytest.approx(late / (steps - steps // 2))
    assert max(growth.values()) <= bound, f"RSS growth per step over steps {steps // 2}->{steps}: {growth}"
    loss = b["loss"]
    assert loss["abs_diff"] == abs(loss["parallel"] - loss["reference"]) <= C.PARITY_ABS_TOL, loss
    assert loss["max_abs_diff"] <= C.PARITY_ABS_TOL and len(b["runs"]["parallel"]["losses"]) == steps
    assert b["runs"]["parallel"]["losses"][-1] < b["runs"]["parallel"]["losses"][0]  # it trains
    # the printed table (a row per process) and the verdict lines; progress on stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(f"| {backend}")]
    assert len(rows) == 5, r.stdout
    assert f"{backend} loss at step {steps}: parallel" in r.stdout and f"{backend} memory: largest growth" in r.stdout
    assert f"{steps}/{steps}" in r.stderr and "Traceback" not in r.stderr
    print(f"{backend}: quick soak {wall:.1f} s; growth MiB/step {growth}; |loss diff| {loss['abs_diff']:.2e}")


def test_a_run_past_its_timeout_fails_the_soak_with_every_rank_stopped():
    pytest.importorskip("torch")
    r = run_bench(["--soak", "--quick", "--backends", "torch", "--timeout", "1", "--no-progress"], timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the soak failed: the torch parallel run (4 processes, dp 2 x EP 2) failed with exit code 124" in r.stderr
    assert "timed out after 1 s; all 4 ranks were stopped" in r.stderr and r.stdout == ""


# ---------------------------------------------------------------------- in-process: options, records, verdict

@pytest.mark.parametrize("argv, message", [
    (["--steps", "3"], "--steps applies to --soak only"),
    (["--max-growth", "1"], "--max-growth applies to --soak only"),
    (["--soak", "--steps", "1"], "--steps 1 is not allowed: a soak needs at least 2 steps"),
    (["--soak", "--nproc", "0"], "--nproc 0 is not allowed: it must be a positive integer"),
    (["--soak", "--nproc", "3"], "--nproc 3 does not fit the soak's model: the demo lays 3 processes out as dp 1 x "
                                 "ep 3 x tp 1, and --ep 3 does not divide the number of experts (8"),
    (["--soak", "--max-growth", "-1"], "--max-growth -1 is not allowed: it must be a finite number of MiB per step"),
    (["--soak", "--max-growth", "inf"], "--max-growth inf is not allowed"),
    (["--soak", "--timeout", "0"], "--timeout 0 is not allowed: it must be a positive, finite number of seconds"),
    (["--soak", "--backends", "jax"], "--backends 'jax': valid backends are ['torch', 'mindspore']"),
], ids=["steps-without-soak", "growth-without-soak", "one-step", "no-process", "layout-not-fitting",
        "negative-growth", "infinite-growth", "zero-timeout", "unknown-backend"])
def test_bad_soak_options_are_one_line_exit_2_and_launch_nothing(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(soak, "run", lambda *a, **k: pytest.fail("a run was started"))
    monkeypatch.setattr("hyper_parallel._select.available_backends", lambda: {"torch": True, "mindspore": True})
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyper-parallel bench: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_sample_steps():
    assert soak.sample_steps(200) == (1, 100, 200)
    assert soak.sample_steps(40) == (1, 20, 40)
    assert soak.sample_steps(3) == (1, 3) and soak.sample_steps(2) == (1, 2)
    for bad in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match=f"a soak needs at least 2 steps .*got {bad!r}"):
            soak.sample_steps(bad)


def test_plan_samples_every_run_at_the_same_steps():
    runs = soak.plan(["torch", "mindspore"], soak.FULL)
    assert [(kind, s.backend, s.nproc, s.layout) for kind, s in runs] == [
        ("parallel", "torch", 4, "dp 2 x EP 2"), ("reference", "torch", 1, "single"),
        ("parallel", "mindspore", 4, "dp 2 x EP 2"), ("reference", "mindspore", 1, "single")]
    assert all(s.memory_steps == (1, 100, 200) and s.steps == 200 and s.model == C.ModelConfig() for _, s in runs)
    spec = runs[0][1]
    assert C.RunSpec.from_json(spec.to_json()) == spec  # the tuple survives the JSON the ranks read


def test_resident_memory_and_the_records_every_rank_prints():
    mib, kind = resident_mib()
    assert kind == "current" and 5 < mib < 1 << 20
    bar = report.ProgressBar("run", 2, 10, enabled=False)
    sink = report.RecordSink(bar)
    rec = {"event": "memory", "step": 2, "rank": 3, "rss_mib": 400.5, "kind": "current"}
    sink.write(f"[rank 3] {RECORD_PREFIX}{json.dumps(rec)}\n")
    sink.write(f'[rank 0] {RECORD_PREFIX}{{"event": "step", "step": 0, "loss": 1.0, "time_s": 0.1, "load": []}}\n')
    assert sink.memory == [rec] and [s["step"] for s in sink.steps] == [0]


def _results(runs, rss, losses) -> dict:
    """Fake ``run_one`` results: ``rss[(backend, kind)][rank]`` are the samples, ``losses[(backend, kind)]`` the
    curve."""
    out = {}
    for kind, spec in runs:
        samples = rss[(spec.backend, kind)]
        out[f"{spec.backend}/{kind}"] = {
            "losses": losses[(spec.backend, kind)], "last_loss": losses[(spec.backend, kind)][-1], "wall_s": 1.0,
            "load": [[1, 1]] * len(losses[(spec.backend, kind)]),
            "memory": [{"event": "memory", "step": s, "rank": r, "rss_mib": v, "kind": "current"}
                       for r, vs in enumerate(samples) for s, v in zip(spec.memory_steps, vs)]}
    return out


def test_verdict_fails_on_a_growing_process_and_on_a_loss_off_the_reference():
    size = soak.SoakSize(steps=40, nproc=2, model=C.ModelConfig())
    runs = soak.plan(["torch", "mindspore"], size)
    flat = [300.0, 305.0, 305.5]  # warm-up, then +0.025 MiB/step: not bounded, then noise
    rss = {("torch", "parallel"): [flat, flat], ("torch", "reference"): [flat],
           # rank 1 grows 1 MiB/step over steps 20->40; the reference 0.1
           ("mindspore", "parallel"): [flat, [300.0, 320.0, 340.0]], ("mindspore", "reference"): [[300, 302, 304]]}
    good = [1.0] * 39 + [0.5]
    losses = {("torch", "parallel"): good, ("torch", "reference"): [1.0] * 39 + [0.5 + 2e-5],
              ("mindspore", "parallel"): good, ("mindspore", "reference"): good}
    rep = soak.evaluate(runs, _results(runs, rss, losses))
    t, m = rep["backends"]["torch"], rep["backends"]["mindspore"]
    assert t["memory_ok"] is True and t["loss"]["ok"] is False and t["loss"]["abs_diff"] == pytest.approx(2e-5)
    assert m["loss"]["ok"] is True and m["memory_ok"] is False and rep["ok"] is False
    assert [p["ok"] for p in m["runs"]["parallel"]["processes"]] == [True, False]
    assert m["runs"]["parallel"]["processes"][1]["late_mib_per_step"] == pytest.approx(1.0)
    assert m["runs"]["parallel"]["processes"][1]["growth_mib"] == pytest.approx(40.0)
    assert m["growth_bound_mib_per_step"] == soak.GROWTH_BOUND_MIB_PER_STEP["mindspore"]
    text = soak.format_soak(rep)
    assert "| mindspore | parallel  |    1 |  300.0 |   320.0 |   340.0 |        +40.0 |          +1.000 | GROWS" \
        in text
    assert "| torch     | parallel  |    0 |  300.0 |   305.0 |   305.5 |         +5.5 |          +0.025 | flat" in text
    assert "| mindspore | reference |    0 |  300.0 |   302.0 |   304.0 |         +4.0 |          +0.100 | flat" in text
    assert "torch loss at step 40: parallel 0.50000000, single process 0.50002000, |diff| 2.00e-05" in text
    assert "limit 1e-05): FAILED" in text
    assert "mindspore memory: largest growth +1.000 MiB/step over steps 20->40 of any process (limit 0.4 " \
           "MiB/step; above the noise (0.1 MiB/step) is this backend's known residual): FAILED" in text
    assert "torch memory: largest growth +0.025 MiB/step over steps 20->40 of any process (limit 0.1 MiB/step): " \
           "OK" in text
    # one bound for every backend (--max-growth): rank 1's +1 MiB/step passes 1.2; the reference's +0.1 fails 0.05
    assert soak.evaluate(runs, _results(runs, rss, losses), {"torch": 1.2, "mindspore": 1.2})["backends"][
        "mindspore"]["memory_ok"] is True
    assert "| residual" not in text
    rss[("mindspore", "reference")] = [[300, 302, 306]]  # +0.2 MiB/step: above the noise, within 0.4
    assert "| mindspore | reference |    0 |  300.0 |   302.0 |   306.0 |         +6.0 |          +0.200 | residual" \
        in soak.format_soak(soak.evaluate(runs, _results(runs, rss, losses)))
    strict = soak.evaluate(runs, _results(runs, rss, losses), {"torch": 0.05, "mindspore": 0.05})
    assert [p["ok"] for p in strict["backends"]["mindspore"]["runs"]["reference"]["processes"]] == [False]
    losses[("mindspore", "parallel")] = [1.0, float("nan")] + [1.0] * 37 + [0.5]  # a NaN step, then the same loss
    assert soak.evaluate(runs, _results(runs, rss, losses))["backends"]["mindspore"]["loss"]["ok"] is False
    with pytest.raises(ValueError, match=r"no memory growth bound for backend \['mindspore'\]: bounds are given "
                                         r"for \['torch'\]"):
        soak.evaluate(runs, _results(runs, rss, losses), {"torch": 0.1})
    short = _results(runs, rss, losses)
    short["torch/parallel"]["memory"] = [r for r in short["torch/parallel"]["memory"]
                                         if not (r["rank"] == 1 and r["step"] == 40)]
    with pytest.raises(ValueError, match=r"the torch parallel run has no memory sample of rank 1 at steps \[40\] "
                                         r"\(expected one at each of \[1, 20, 40\]\)"):
        soak.evaluate(runs, short)


def test_cli_exit_codes_of_a_failed_check_and_a_failed_run(monkeypatch, capsys, tmp_path):
    size = soak.SoakSize(steps=4, nproc=2, model=C.ModelConfig())
    runs = soak.plan(["torch"], size)
    flat = [300.0, 300.0, 300.0]
    rss = {("torch", "parallel"): [flat, flat], ("torch", "reference"): [flat]}
    losses = {("torch", "parallel"): [1.0, 0.9, 0.8, 0.7], ("torch", "reference"): [1.0, 0.9, 0.8, 0.7]}
    seen = {}

    def fake_run(backends, size, timeout_s, progress, max_growth_mib_per_step):
        seen.update(backends=backends, size=size, timeout_s=timeout_s, progress=progress,
                    bound=max_growth_mib_per_step)
        bounds = None if max_growth_mib_per_step is None else {"torch": max_growth_mib_per_step}
        return soak.evaluate(runs, _results(runs, rss, losses), bounds)

    monkeypatch.setattr(soak, "run", fake_run)
    monkeypatch.setattr("hyper_parallel._select.available_backends", lambda: {"torch": True, "mindspore": False})
    out = tmp_path / "s.json"
    assert bench.main(["--soak", "--backends", "torch", "--steps", "4", "--nproc", "2", "--json", str(out)]) == 0
    assert seen == {"backends": ["torch"], "size": size, "timeout_s": soak.DEFAULT_TIMEOUT_S, "progress": True,
                    "bound": None}
    assert "torch memory: largest growth +0.000 MiB/step" in capsys.readouterr().out
    assert json.loads(out.read_text())["meta"]["command"] == (f"hyper-parallel bench --soak --backends torch --steps "
                                                             f"4 --nproc 2 --json {out}")
    assert bench.main(["--soak", "--quick", "--backends", "torch", "--no-progress", "--timeout", "9"]) == 0
    assert seen["size"] == soak.QUICK and seen["progress"] is False and seen["timeout_s"] == 9
    capsys.readouterr()
    losses[("torch", "reference")] = [1.0, 0.9, 0.8, 0.8]
    assert bench.main(["--soak", "--backends", "torch", "--steps", "4", "--nproc", "2"]) == 1
    assert "FAILED: the soak's memory grew or its loss left the single-process run's" in capsys.readouterr().err

    def failing(*a, **k):
        raise soak.RunFailed("the torch parallel run (2 processes, EP 2) failed with exit code 7", 7)

    monkeypatch.setattr(soak, "run", failing)
    assert bench.main(["--soak", "--backends", "torch"]) == 1
    assert "the soak failed: the torch parallel run (2 processes, EP 2) failed with exit code 7" in \
        capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(soak, "run", interrupted)
    assert bench.main(["--soak", "--backends", "torch"]) == 130
    assert "soak interrupted; every rank was stopped" in capsys.readouterr().err
