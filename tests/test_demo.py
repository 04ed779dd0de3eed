"""``hyper-parallel demo``: real (short) runs on each backend against their single-process references, the
``--compare-backends`` closing note, every bad-input case (exit 2, one line, no traceback, nothing launched), and
the driver's reporting paths in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hyper_parallel.demo import config as C
from hyper_parallel.demo import driver, report
from hyper_parallel.demo.task import TeacherTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("HYPER_PARALLEL_PLATFORM", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_demo(args: list[str], module: str = "hyper_parallel", timeout: float = 300, **env):
    cmd = [sys.executable, "-m", module] + (["demo"] if module == "hyper_parallel" else []) + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=ROOT)


def _processes_with(token: str) -> list[str]:
    """Command lines of live processes containing ``token`` (a leftover rank would show up here)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if token in cmd:
                found.append(cmd)
    return found


def _check_png(path: str) -> None:
    import matplotlib.image

    assert os.path.getsize(path) > 30_000
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 600 and img.shape[1] > 1200
    assert img[..., :3].std() > 0.1  # curves, a heatmap and text, not a blank canvas


def _check_summary(out: str, backends: list[str], layout: str, nproc: int) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["ok"] is True and s["backends"] == backends
    assert s["config"]["layout"] == layout and s["config"]["nproc"] == nproc
    for b in backends:
        par, ref = s["runs"][f"{b}/parallel"], s["runs"][f"{b}/reference"]
        assert len(par["losses"]) == len(ref["losses"]) == STEPS
        assert par["nproc"] == nproc and ref["nproc"] == 1
        diffs = [abs(x - y) for x, y in zip(par["losses"], ref["losses"])]
        assert s["parity"][b]["max_abs_diff"] == max(diffs) <= 1e-5
        assert s["parity"][b]["ok"] is True
        assert min(par["losses"][1:]) < par["losses"][0]  # it learns
        assert par["tokens_per_s"] > 0 and ref["tokens_per_s"] > 0
        # every layer routes tokens * top_k pairs per step, counted over the whole global batch
        cfg = s["config"]
        for load in par["load"]:
            for layer in range(cfg["layers"]):
                assert sum(load[layer * cfg["experts"]:(layer + 1) * cfg["experts"]]) == cfg["tokens"] * cfg["top_k"]
        assert par["load"] == ref["load"]
        # the same model whatever the layout: sharded parameters counted once, at their global shape
        assert par["params"]["model"] == ref["params"]["model"] == ref["params"]["per_rank"]
        assert par["params"]["per_rank"] < ref["params"]["per_rank"]
    _check_png(os.path.join(out, "demo.png"))
    return s


@pytest.mark.backends("torch", "mindspore")
def test_default_layout_matches_single_process_reference(backend, tmp_path):
    """The default job (4 processes, ExpertTensorParallel 2x2), selected through HYPER_PARALLEL_PLATFORM."""
    out = str(tmp_path / "out")
    r = run_demo(["--steps", str(STEPS), "--out", out], HYPER_PARALLEL_PLATFORM=backend)
    assert r.returncode == 0, r.stdout + r.stderr
    _check_summary(out, [backend], "dp 2 x EP 2", 4)
    assert f"parity {backend}: max over {STEPS} steps" in r.stdout and "OK" in r.stdout
    assert "Traceback" not in r.stderr
    assert f"{STEPS}/{STEPS}" in r.stderr  # the progress bar reached the end (one line per 10% off a terminal)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("args, layout, nproc", [(["--nproc", "2"], "EP 2", 2),
                                                 (["--nproc", "2", "--tp", "2"], "TP 2", 2),
                                                 (["--ep", "2", "--tp", "2"], "ETP 2x2", 4),
                                                 (["--dp", "2", "--tp", "2"], "dp 2 x TP 2", 4)])
def test_other_layouts_match_reference(backend, tmp_path, args, layout, nproc):
    out = str(tmp_path / "out")
    r = run_demo([*args, "--backend", backend, "--steps", str(STEPS), "--out", out], module="hyper_parallel.demo")
    assert r.returncode == 0, r.stdout + r.stderr
    _check_summary(out, [backend], layout, nproc)


@pytest.mark.backends("mindspore")  # needs both frameworks; runs in the MindSpore pass
def test_compare_backends_reports_the_per_step_difference(backend, tmp_path):
    out = str(tmp_path / "out")
    r = run_demo(["--compare-backends", "--nproc", "2", "--steps", str(STEPS), "--out", out])
    assert r.returncode == 0, r.stdout + r.stderr
    s = _check_summary(out, ["torch", "mindspore"], "EP 2", 2)
    cross = s["cross_backend"]
    t, m = s["runs"]["torch/parallel"]["losses"], s["runs"]["mindspore/parallel"]["losses"]
    assert cross["per_step_rel_diff"] == [abs(a - b) / abs(a) for a, b in zip(t, m)]
    assert cross["max_rel_diff"] <= 1e-4 and cross["ok"] is True
    assert "torch vs mindspore (parallel runs): per-step" in r.stdout
    runs = s["runs"]
    for kind, label in (("parallel", "parallel"), ("reference", "single process")):
        ratio = runs[f"mindspore/{kind}"]["tokens_per_s"] / runs[f"torch/{kind}"]["tokens_per_s"]
        assert cross["speed_ratio"][kind] == ratio
        words = f"1/{1 / ratio:.1f}" if ratio < 1 else f"{ratio:.2f}x"
        assert (f"{label} {words} ({runs[f'mindspore/{kind}']['tokens_per_s']:,.0f} vs "
                f"{runs[f'torch/{kind}']['tokens_per_s']:,.0f})") in r.stdout, r.stdout
    assert "mindspore vs torch tokens/s: parallel " in r.stdout


BAD_INPUT = {  # id: (arguments, environment, words the one error line must contain)
    "ep-not-dividing-nproc": (["--ep", "3", "--nproc", "4"], {}, ["--ep 3", "--nproc 4", "ep must divide nproc"]),
    "ep-not-dividing-experts": (["--ep", "3", "--nproc", "3"], {}, ["--ep 3", "number of experts (8",
                                                                     "whole experts"]),
    "ep-not-dividing-6-experts": (["--ep", "4", "--nproc", "4", "--experts", "6"], {},
                                  ["--ep 4", "number of experts (6"]),
    "unknown-backend-flag": (["--backend", "nosuch"], {}, ["--backend 'nosuch'", "not a known backend",
                                                           "valid backends are"]),
    "unknown-backend-env": ([], {"HYPER_PARALLEL_PLATFORM": "nosuch"}, ["HYPER_PARALLEL_PLATFORM 'nosuch'",
                                                                       "not a known backend"]),
    "tp-not-dividing-hidden": (["--tp", "3", "--nproc", "3"], {}, ["--tp 3", "hidden size (64)"]),
    "tp-not-dividing-nproc": (["--tp", "3"], {}, ["--tp 3 does not divide --nproc 4", "tp must divide nproc"]),
    "layers-zero": (["--layers", "0"], {}, ["--layers 0", "positive integer"]),
    "grid-not-nproc": (["--ep", "2", "--tp", "3"], {}, ["--ep 2 x --tp 3 = 6", "--nproc is 4"]),
    "ep-zero": (["--ep", "0"], {}, ["--ep 0", "positive integer"]),
    "nproc-not-int": (["--nproc", "two"], {}, ["--nproc", "invalid int value: 'two'"]),
    "steps-zero": (["--steps", "0"], {}, ["--steps 0"]),
    "tokens-not-sharding": (["--tokens", "510", "--ep", "4", "--nproc", "4"], {},
                            ["--tokens 510", "divisible by --ep 4"]),
    "tokens-not-sharding-dp": (["--tokens", "514"], {}, ["--tokens 514", "divisible by dp x ep = 4"]),
    "dp-grid-not-nproc": (["--dp", "3", "--ep", "2"], {}, ["--dp 3 x --ep 2 = 6", "--nproc is 4"]),
    "dp-zero": (["--dp", "0"], {}, ["--dp 0", "positive integer"]),
    "too-few-experts": (["--experts", "1"], {}, ["--experts 1", "top_k = 2"]),
    "timeout-zero": (["--timeout", "0"], {}, ["--timeout 0"]),
    "compare-with-backend": (["--compare-backends", "--backend", "torch"], {},
                             ["--backend 'torch'", "--compare-backends"]),
    "unknown-option": (["--frobnicate"], {}, ["unrecognized arguments: --frobnicate"]),
    "resume-not-saved": (["--resume", "/nonexistent/ckpt"], {}, ["--resume '/nonexistent/ckpt'",
                                                                 "not a directory written by --save"]),
    "save-with-compare": (["--save", "/nonexistent/ckpt", "--compare-backends"], {},
                          ["--save cannot be combined with --compare-backends"]),
}


@pytest.mark.parametrize("args, env, words", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_launches_nothing(tmp_path, args, env, words):
    out = tmp_path / "out"
    token = "424242"  # in the spec JSON of any rank that would be started
    r = run_demo([*args, "--out", str(out), "--seed", token], timeout=60, **env)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hyper-parallel demo: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()  # checked before anything is created or launched
    assert _processes_with(f'"seed": {token}') == []


def test_out_that_is_a_file_is_bad_input(tmp_path):
    path = tmp_path / "taken"
    path.write_text("")
    r = run_demo(["--out", str(path)], timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--out '{path}' cannot be used as the output directory" in r.stderr


def test_a_failing_run_stops_every_rank_and_returns_its_exit_code(tmp_path):
    token = "515151"
    r = run_demo(["--nproc", "2", "--timeout", "0.5", "--seed", token, "--out", str(tmp_path / "o")],
                 HYPER_PARALLEL_PLATFORM="torch")
    assert r.returncode == 124, r.stdout + r.stderr  # the launcher's timeout code
    assert "timed out" in r.stderr and "failed with exit code 124" in r.stderr
    assert _processes_with(f'"seed": {token}') == []


def _losses(out: str, backend: str) -> list[float]:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["runs"][f"{backend}/parallel"]["losses"]


@pytest.mark.backends("torch")
def test_save_then_resume_at_another_layout_and_in_mindspore_continues_the_same_run(backend, tmp_path):
    """--save after 3 steps at dp 2 x EP 2, --resume at EP 4 (and on MindSpore) for 3 more: the losses of one
    straight 6-step run, within 1e-6 relative (bit for bit at the other layout in practice)."""
    ckpt, straight, first, again, ms = (str(tmp_path / n) for n in ("ckpt", "straight", "first", "again", "ms"))
    r = run_demo(["--steps", "6", "--out", straight])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_demo(["--steps", "3", "--save", ckpt, "--out", first])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_demo(["--steps", "3", "--resume", ckpt, "--ep", "4", "--out", again])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_demo(["--steps", "3", "--resume", ckpt, "--backend", "mindspore", "--out", ms], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = _losses(straight, "torch")
    with open(os.path.join(ckpt, "demo.json")) as f:
        saved = json.load(f)
    assert saved["step"] == 3 and saved["losses"]["parallel"] == want[:3] == _losses(first, "torch")
    for got in (_losses(again, "torch"), _losses(ms, "mindspore")):
        assert all(abs(a - b) <= 1e-6 * b for a, b in zip(got, want[3:])), (got, want[3:])
    with open(os.path.join(again, "summary.json")) as f:
        assert json.load(f)["resumed"]["step"] == 3
    _check_png(os.path.join(again, "demo.png"))


# ---------------------------------------------------------------------- in-process: layouts, task, reporting

@pytest.mark.parametrize("nproc, dp, ep, tp, want", [(4, None, None, None, (2, 2, 1)), (2, None, None, None, (1, 2, 1)),
                                                     (6, None, None, None, (2, 3, 1)), (3, None, None, None, (1, 3, 1)),
                                                     (1, None, None, None, (1, 1, 1)), (4, None, 4, None, (1, 4, 1)),
                                                     (4, None, None, 4, (1, 1, 4)), (8, None, 2, 4, (1, 2, 4)),
                                                     (4, None, 2, 2, (1, 2, 2)), (8, 2, None, 2, (2, 2, 2)),
                                                     (4, 4, None, None, (4, 1, 1)), (8, 2, 2, 2, (2, 2, 2))])
def test_layout_resolution(nproc, dp, ep, tp, want):
    assert C.resolve_layout(nproc, ep, tp, dp) == want


def test_layout_names():
    m = C.ModelConfig()
    names = {(e, t): (C.RunSpec("torch", e * t, e, t, 1, m).style, C.RunSpec("torch", e * t, e, t, 1, m).layout)
             for e, t in [(2, 2), (2, 1), (1, 2), (1, 1)]}
    assert names == {(2, 2): ("ExpertTensorParallel", "ETP 2x2"), (2, 1): ("ExpertParallel", "EP 2"),
                     (1, 2): ("TensorParallel", "TP 2"), (1, 1): ("single process", "single")}
    assert [C.RunSpec("torch", 2 * e * t, e, t, 1, m, dp=2).layout for e, t in [(2, 1), (2, 2), (1, 1)]] == \
        ["dp 2 x EP 2", "dp 2 x ETP 2x2", "dp 2"]
    spec = C.RunSpec("torch", 4, 2, 2, 5, m)
    assert C.RunSpec.from_json(spec.to_json()) == spec


def test_task_shards_are_the_global_batch():
    task = TeacherTask(dim=8, experts=4, hidden=4, tokens=12, seed=3)
    x, y = task.batch(5)
    parts = [task.batch(5, i, 3) for i in range(3)]
    assert (x == __import__("numpy").concatenate([p[0] for p in parts])).all()
    assert (y == __import__("numpy").concatenate([p[1] for p in parts])).all()
    assert not (task.batch(6)[0] == x).all()
    with pytest.raises(ValueError, match="split evenly"):
        task.batch(0, 0, 5)


def test_backend_resolution_and_missing_framework(monkeypatch):
    assert C.resolve_backend(None, {}) == "torch"
    assert C.resolve_backend(None, {"HYPER_PARALLEL_PLATFORM": " MindSpore "}) == "mindspore"
    assert C.resolve_backend("torch", {"HYPER_PARALLEL_PLATFORM": "mindspore"}) == "torch"
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(C.DemoInputError, match=r"--backend 'torch' needs the 'torch' package.*pip install"):
        C.resolve_backend("torch", {})
    with pytest.raises(C.DemoInputError, match="matplotlib, which is not installed"):
        C.check_plotting()


class _Tty:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_bar_and_sink():
    tty = _Tty()
    bar = report.ProgressBar("run", 3, 100, stream=tty)
    sink = report.RecordSink(bar, stream=tty)
    sink.write('[rank 0] @@hpdemo {"event": "start", "params": {"per_rank": 1, "model": 2}}\n[rank 1] a warn')
    sink.writelines(["ing\n", '[rank 0] @@hpdemo {"event": "step", "step": 0, "loss": 0.5, "time_s": 1.0, '
                     '"load": []}\n'])
    for step in (1, 2):
        sink.write(f'[rank 0] @@hpdemo {{"event": "step", "step": {step}, "loss": 0.25, "time_s": 0.5, '
                   f'"load": []}}\n')
    bar.close()
    sink.flush()
    assert sink.start == {"event": "start", "params": {"per_rank": 1, "model": 2}}
    assert [s["step"] for s in sink.steps] == [0, 1, 2]
    assert "[rank 1] a warning\n" in tty.text
    assert tty.text.rstrip().endswith("3/3  loss 0.250000  200 tok/s")
    assert report.tokens_per_second(sink.steps, 100) == 200  # step 0 (warm-up) left out
    assert report.tokens_per_second(sink.steps[:1], 100) == 100


def _fake_results(losses_by_run: dict, layers=1, experts=2, tokens=4):
    out = {}
    for key, losses in losses_by_run.items():
        backend, kind = key.split("/")
        out[key] = {"backend": backend, "kind": kind, "nproc": 2 if kind == "parallel" else 1, "ep": 2, "tp": 1,
                    "style": "ExpertParallel", "layout": "EP 2" if kind == "parallel" else "single",
                    "losses": losses, "first_loss": losses[0], "last_loss": losses[-1],
                    "step_time_s": [0.1] * len(losses), "tokens_per_s": 40.0, "wall_s": 1.0, "params": None,
                    "load": [[4, 4] * layers for _ in losses]}
    return out


def test_failed_parity_exits_1_with_the_plot_and_json_written(tmp_path, monkeypatch, capsys):
    """The verdict paths, with the runs replaced by fixed loss curves (one outside the limit)."""
    curves = {"torch/parallel": [1.0, 0.5, 0.25], "torch/reference": [1.0, 0.5, 0.2501],
              "mindspore/parallel": [1.0, 0.5001, 0.25], "mindspore/reference": [1.0, 0.5001, 0.25]}
    results = _fake_results(curves)
    monkeypatch.setattr(driver, "run_one", lambda spec, kind, out, timeout: results[f"{spec.backend}/{kind}"])
    out = tmp_path / "o"
    code = driver.main(["--compare-backends", "--steps", "3", "--out", str(out), "--layers", "1",
                        "--experts", "2", "--tokens", "4", "--nproc", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "parity torch: max over 3 steps of |loss_parallel - loss_reference| = 1.00e-04" in captured.out
    assert "FAILED" in captured.out and "FAILED: a loss curve is outside its limit" in captured.err
    s = json.loads((out / "summary.json").read_text())
    assert s["parity"]["torch"]["ok"] is False and s["parity"]["mindspore"]["ok"] is True
    assert s["cross_backend"]["ok"] is False and s["cross_backend"]["max_rel_diff"] == pytest.approx(2e-4)
    _check_png(str(out / "demo.png"))


def test_interrupt_and_a_run_without_records(tmp_path, monkeypatch, capsys):
    import hyper_parallel.launch

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hyper_parallel.launch, "launch", interrupted)
    assert driver.main(["--nproc", "2", "--out", str(tmp_path)]) == 130
    assert "interrupted; every rank was stopped" in capsys.readouterr().err
    monkeypatch.setattr(hyper_parallel.launch, "launch", lambda *a, **k: 0)  # exits 0 but reports nothing
    assert driver.main(["--nproc", "2", "--steps", "2", "--out", str(tmp_path)]) == 1
    assert "the torch parallel run reported 0 of 2 steps" in capsys.readouterr().err


def test_help_and_cli_dispatch(capsys, monkeypatch):
    from hyper_parallel import cli

    assert driver.main(["--help"]) == 0
    assert "--compare-backends" in capsys.readouterr().out
    seen = []
    import hyper_parallel.demo as demo_pkg

    monkeypatch.setattr(demo_pkg, "main", lambda argv: seen.append(("demo", argv)) or 0)
    assert cli.main(["demo", "--ep", "2", "--help"]) == 0
    assert seen == [("demo", ["--ep", "2", "--help"])]
    import hyper_parallel.bench

    monkeypatch.setattr(hyper_parallel.bench, "main", lambda argv: seen.append(("bench", argv)) or 3)
    assert cli.main(["bench", "--quick"]) == 3
    assert seen[-1] == ("bench", ["--quick"])
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])


def _run(losses, loads, margins=None):
    return {"losses": losses, "load": loads, "routing_margin": margins or [None] * len(losses)}


def test_loss_parity_accepts_a_routing_split_only_at_a_recorded_tie():
    """Routing is discrete: a token at a near-tie may go either way on another layout. The parity check accepts the
    runs' routing differing only from a step where the single-process run had a tie, with the losses equal before."""
    same, moved = [4, 4], [5, 3]
    par = _run([1.0, 0.5, 0.30, 0.20], [same, same, moved, moved])
    tie = _run([1.0, 0.5, 0.25, 0.10], [same, same, same, same], [0.1, 0.1, 2e-7, 0.1])
    r = driver.loss_parity(par, tie)
    assert r["ok"] and r["routing_split_step"] == 2 and r["max_abs_diff"] == 0.0
    assert r["max_abs_diff_all_steps"] == pytest.approx(0.1) and r["routing_margin_at_split"] == 2e-7
    assert "before the routing first differed (step 2; a tie" in driver.parity_words(r, 4)
    # the same split where the single-process run had no tie: a routing bug, refused
    no_tie = _run(tie["losses"], tie["load"], [0.1, 0.1, 0.03, 0.1])
    assert not driver.loss_parity(par, no_tie)["ok"]
    # a split with no margin recorded (an older run) is refused too
    assert not driver.loss_parity(par, _run(tie["losses"], tie["load"]))["ok"]
    # a loss difference before the split is still a failure
    early = _run([1.0, 0.5 + 1e-4, 0.25, 0.10], tie["load"], tie["routing_margin"])
    assert not driver.loss_parity(par, early)["ok"]
    # a NaN anywhere fails, even after the split
    nan = _run([1.0, 0.5, 0.30, float("nan")], par["load"])
    assert not driver.loss_parity(nan, tie)["ok"]
    # identical routing: every step is bounded
    r = driver.loss_parity(_run([1.0, 0.5], [same, same]), _run([1.0, 0.5 + 2e-5], [same, same]))
    assert not r["ok"] and r["routing_split_step"] is None and r["max_abs_diff"] == pytest.approx(2e-5)
