"""``hyper-parallel demo``: train a small MoE on N local processes and check it against one process.

    hyper-parallel demo                        # torch, 4 processes: dp 2 x ExpertParallel 2
    hyper-parallel demo --ep 2 --tp 2          # ExpertTensorParallel 2x2
    hyper-parallel demo --backend mindspore    # or HYPER_PARALLEL_PLATFORM=mindspore
    hyper-parallel demo --nproc 2 --ep 2       # ExpertParallel over 2 processes
    hyper-parallel demo --compare-backends     # the same job on torch and on MindSpore

Each backend trains twice with the same seed and the same global batches: in parallel on ``--nproc`` processes
(through :func:`hyper_parallel.launch.launch`) and on a single process (the reference). The driver shows a
progress bar per run, then writes ``summary.json`` and ``demo.png`` into ``--out`` and prints a summary table.

Exit codes: 0 when every loss curve matches its reference within 1e-5 while the two runs route alike (a routing
difference is accepted only at a recorded tie: :func:`loss_parity`) and, with ``--compare-backends``, torch and
MindSpore agree within 1e-4 relative at every step; 1 when a check fails; 2 for bad input (one line on
stderr, nothing launched); a failing run's exit code otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence

from hyper_parallel.demo import config as C

PROG = "hyper-parallel demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the caller prints it and exits 2
        raise C.DemoInputError(message)


def _parser() -> argparse.ArgumentParser:
    d = C.ModelConfig()
    p = _Parser(prog=PROG, description="Train a small seeded MoE model on N local processes and check its loss "
                "curve against a single-process run of the same job. Writes summary.json and demo.png into --out.")
    p.add_argument("--nproc", type=int, default=4, help="local processes of the parallel run (default 4)")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel replicas of the ep x tp grid; default: 2 when nproc is even and >= 4 and no "
                        "other size is given, else 1")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree (its ranks feed different tokens too); default: nproc / (dp * tp)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree of every expert (its ranks hold the same tokens); default 1")
    p.add_argument("--steps", type=int, default=60, help="training steps (default %(default)s)")
    p.add_argument("--backend", default=None,
                   help="torch or mindspore (default: $HYPER_PARALLEL_PLATFORM, else torch)")
    p.add_argument("--compare-backends", action="store_true",
                   help="run the same job on torch and on MindSpore and compare their losses step by step")
    p.add_argument("--out", default="demo_out",
                   help="directory for summary.json, demo.png and the logs (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the model, the teacher and the data (default %(default)s)")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help="global batch: tokens per step, split over the ep ranks (default %(default)s)")
    p.add_argument("--experts", type=int, default=d.experts,
                   help="routed experts per MoE layer (default %(default)s)")
    p.add_argument("--layers", type=int, default=d.layers, help="MoE layers (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds allowed for each run (default %(default)s)")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="save both runs (model, AdamW state, step; hyper_parallel.checkpoint) into DIR at the end")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the runs saved in DIR for --steps more steps, at this run's layout and backend "
                        "(the model's options come from DIR)")
    return p


HISTORY = "demo.json"  # in a --save directory: the model options, the step and the loss curves so far


def _read_history(directory: str) -> dict:
    path = os.path.join(directory, HISTORY)
    try:
        with open(path) as f:
            history = json.load(f)
    except OSError as e:
        raise C.DemoInputError(f"--resume {directory!r} is not a directory written by --save ({path}: "
                               f"{e.strerror})") from None
    except ValueError:
        raise C.DemoInputError(f"--resume {directory!r}: {path} is not valid JSON") from None
    return history


def plan(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[tuple[str, C.RunSpec]]]:
    """Parse and check everything; the runs to do, in order: ``("parallel", spec)`` then ``("reference", spec)``
    per backend.

    Raises:
        DemoInputError: any bad input (the message is one line naming the value and the constraint).
    """
    args = _parser().parse_args(argv)
    if args.compare_backends:
        if args.backend is not None:
            raise C.DemoInputError(f"--backend {args.backend!r} cannot be combined with --compare-backends, which "
                                   f"runs {' and '.join(C.COMPARE_BACKENDS)}")
        for b in C.COMPARE_BACKENDS:
            C.check_installed(b, "--compare-backends")
        backends = list(C.COMPARE_BACKENDS)
    else:
        backends = [C.resolve_backend(args.backend)]
    dp, ep, tp = C.resolve_layout(args.nproc, args.ep, args.tp, args.dp)
    model = C.ModelConfig(seed=args.seed, tokens=args.tokens, experts=args.experts, layers=args.layers)
    if (args.save or args.resume) and args.compare_backends:
        raise C.DemoInputError(f"--{'save' if args.save else 'resume'} cannot be combined with --compare-backends: "
                               "save or resume one backend's runs")
    if args.resume:
        model = C.ModelConfig(**_read_history(args.resume)["model"])
    C.check_model(model, ep, tp, args.steps, dp)
    if not args.timeout > 0:
        raise C.DemoInputError(f"--timeout {args.timeout} is not allowed: it must be a positive number of seconds")
    C.check_plotting()
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise C.DemoInputError(f"--out {args.out!r} cannot be used as the output directory: {e.strerror}") from None
    if args.save:
        try:
            os.makedirs(args.save, exist_ok=True)
        except OSError as e:
            raise C.DemoInputError(f"--save {args.save!r} cannot be used as the checkpoint directory: "
                                   f"{e.strerror}") from None
    runs = []

    def dirs(kind):
        return {"save_dir": os.path.abspath(os.path.join(args.save, kind)) if args.save else "",
                "resume_dir": os.path.abspath(os.path.join(args.resume, kind)) if args.resume else ""}

    for b in backends:
        runs.append(("parallel", C.RunSpec(backend=b, nproc=args.nproc, ep=ep, tp=tp, steps=args.steps,
                                           model=model, dp=dp, **dirs("parallel"))))
        runs.append(("reference", C.RunSpec(backend=b, nproc=1, ep=1, tp=1, steps=args.steps, model=model,
                                            **dirs("reference"))))
    return args, runs


@contextlib.contextmanager
def _child_env(spec: C.RunSpec, log_dir: str):
    """The ranks' environment: the package importable, MindSpore's logs into ``log_dir``. Values the user set
    win."""
    import hyper_parallel

    root = os.path.dirname(os.path.dirname(os.path.abspath(hyper_parallel.__file__)))
    path = os.environ.get("PYTHONPATH", "")
    # (one OpenMP thread per rank comes from the launcher, blocking MindSpore launches on CPU from its adapter)
    want = {"PYTHONPATH": root + (os.pathsep + path if path else "")}
    if spec.backend == "mindspore":
        want.update({k: os.environ.get(k, v) for k, v in
                     (("GLOG_v", "3"), ("GLOG_logtostderr", "0"), ("GLOG_log_dir", os.path.abspath(log_dir)))})
    saved = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_one(spec: C.RunSpec, kind: str, out_dir: str, timeout_s: float, progress: bool = True) -> dict:
    """Launch one run and collect its records (with ``progress``, a progress bar on stderr). Raises ``_RunFailed``
    with the exit code on failure."""
    from hyper_parallel.demo.report import ProgressBar, RecordSink, tokens_per_second
    from hyper_parallel.launch import launch

    label = f"{spec.backend:<9} {kind:<9} {spec.nproc} proc{'s' if spec.nproc > 1 else ' '} {spec.layout:<8}"
    bar = ProgressBar(label, spec.steps, spec.model.tokens, enabled=progress)
    sink = RecordSink(bar)
    log_dir = os.path.join(out_dir, "logs", f"{spec.backend}-{kind}")  # MindSpore's own logs (glog)
    if spec.backend == "mindspore":
        os.makedirs(log_dir, exist_ok=True)
    t0 = time.monotonic()
    with _child_env(spec, log_dir):
        code = launch(["-m", "hyper_parallel.demo.train", spec.to_json()], spec.nproc, backend=spec.backend,
                      timeout_s=timeout_s, out=sink)
    wall = time.monotonic() - t0
    bar.close()
    if code != 0:
        raise _RunFailed(f"the {spec.backend} {kind} run ({spec.nproc} processes, {spec.layout}) failed with exit "
                         f"code {code} (its output is above)", code)
    if len(sink.steps) != spec.steps:
        raise _RunFailed(f"the {spec.backend} {kind} run reported {len(sink.steps)} of {spec.steps} steps", 1)
    steps = sorted(sink.steps, key=lambda r: r["step"])
    losses = [r["loss"] for r in steps]
    return {"backend": spec.backend, "kind": kind, "nproc": spec.nproc, "dp": spec.dp, "ep": spec.ep,
            "tp": spec.tp, "style": spec.style, "layout": spec.layout, "losses": losses, "first_loss": losses[0],
            "last_loss": losses[-1], "step_time_s": [r["time_s"] for r in steps],
            "tokens_per_s": tokens_per_second(steps, spec.model.tokens), "wall_s": wall,
            "params": (sink.start or {}).get("params"), "load": [r["load"] for r in steps],
            "routing_margin": [r.get("routing_margin") for r in steps],
            "memory": sorted(sink.memory, key=lambda r: (r["step"], r["rank"]))}


class _RunFailed(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def loss_parity(parallel: dict, reference: dict) -> dict:
    """Compare a parallel run's loss curve with the single-process run's (each a :func:`run_one` result).

    The losses must agree within :data:`~hyper_parallel.demo.config.PARITY_ABS_TOL` at every step while both runs
    route every token alike (same per-expert loads). Routing is discrete: at a step where some token's k-th and
    (k+1)-th choices are within :data:`~hyper_parallel.demo.config.ROUTING_TIE_TOL` in the single-process run, float
    rounding on another layout may choose the other expert, and from there the runs train on different routings.
    A routing difference is accepted only at such a tie (the steps from it on are reported, not bounded); a
    routing difference without a tie, a loss difference before it, or a non-finite loss fails.
    """
    par, ref = parallel["losses"], reference["losses"]
    diffs = [abs(x - y) for x, y in zip(par, ref)]
    split = next((i for i, (a, b) in enumerate(zip(parallel["load"], reference["load"])) if a != b), None)
    margins = reference.get("routing_margin") or [None] * len(ref)
    tie = None if split is None else margins[split]
    checked = diffs if split is None else diffs[:split]
    finite = all(math.isfinite(v) for v in (*par, *ref))
    ok = finite and all(d <= C.PARITY_ABS_TOL for d in checked) and \
        (split is None or (tie is not None and tie <= C.ROUTING_TIE_TOL))
    return {"max_abs_diff": max(checked, default=0.0), "max_abs_diff_all_steps": max(diffs, default=0.0),
            "per_step_abs_diff": diffs, "tolerance": C.PARITY_ABS_TOL, "routing_split_step": split,
            "routing_margin_at_split": tie, "tie_tolerance": C.ROUTING_TIE_TOL, "ok": ok}


def parity_words(par: dict, steps: int) -> str:
    """One sentence for :func:`loss_parity`'s result."""
    split = par["routing_split_step"]
    if split is None:
        return (f"max over {steps} steps of |loss_parallel - loss_reference| = {par['max_abs_diff']:.2e}; "
                f"limit {par['tolerance']:.0e}")
    tie = par["routing_margin_at_split"]
    why = (f"a tie: two experts {tie:.1e} apart in the single-process run, limit {par['tie_tolerance']:.0e}"
           if tie is not None else "no tie recorded")
    return (f"max over the {split} steps before the routing first differed (step {split}; {why}) = "
            f"{par['max_abs_diff']:.2e}, limit {par['tolerance']:.0e}; from step {split} on the runs route "
            f"differently (max |diff| {par['max_abs_diff_all_steps']:.2e}, not bounded)")


def summarize(runs: list[tuple[str, C.RunSpec]], results: dict) -> dict:
    from hyper_parallel.demo.report import max_abs_diff, rel_diffs

    backends = list(dict.fromkeys(spec.backend for _, spec in runs))
    par_spec = runs[0][1]
    summary: dict = {
        "config": {**dataclasses.asdict(par_spec.model), "steps": par_spec.steps, "nproc": par_spec.nproc,
                   "dp": par_spec.dp, "ep": par_spec.ep, "tp": par_spec.tp, "style": par_spec.style,
                   "layout": par_spec.layout},
        "backends": backends, "runs": results, "parity": {}, "cross_backend": None,
    }
    for b in backends:
        par, ref = results[f"{b}/parallel"], results[f"{b}/reference"]
        summary["parity"][b] = {**loss_parity(par, ref),
                                "max_rel_diff": max(rel_diffs(ref["losses"], par["losses"]))}
    if len(backends) == 2:
        a, b = (results[f"{x}/parallel"]["losses"] for x in backends)
        rel = rel_diffs(a, b)
        summary["cross_backend"] = {
            "backends": backends, "compared": "parallel runs", "per_step_rel_diff": rel,
            "per_step_abs_diff": [abs(x - y) for x, y in zip(a, b)], "max_rel_diff": max(rel),
            "mean_rel_diff": sum(rel) / len(rel), "max_abs_diff": max_abs_diff(a, b),
            "tolerance": C.CROSS_BACKEND_REL_TOL, "ok": max(rel) <= C.CROSS_BACKEND_REL_TOL,
            # the second backend's tokens/s over the first's, per run (reported, not bounded: machine-dependent)
            "speed_ratio": {kind: results[f"{backends[1]}/{kind}"]["tokens_per_s"]
                            / results[f"{backends[0]}/{kind}"]["tokens_per_s"] for kind in ("parallel", "reference")}}
    summary["ok"] = all(v["ok"] for v in summary["parity"].values()) and \
        (summary["cross_backend"] is None or summary["cross_backend"]["ok"])
    return summary


def print_summary(summary: dict, png: str, js: str, stream=None) -> None:
    from hyper_parallel.demo.report import format_table

    stream = stream or sys.stdout
    cfg = summary["config"]
    w = lambda s="": print(s, file=stream)
    w()
    w(f"hyper-parallel demo: {cfg['layers']} MoE layers x {cfg['experts']} experts (top-{cfg['top_k']}, "
      f"{cfg['shared_experts']} shared expert), {cfg['tokens']} tokens/step, {cfg['steps']} steps, seed "
      f"{cfg['seed']}; parallel layout {cfg['style']} ({cfg['layout']}) on {cfg['nproc']} processes")
    rows = []
    for b in summary["backends"]:
        for kind in ("parallel", "reference"):
            r = summary["runs"][f"{b}/{kind}"]
            diff = f"{summary['parity'][b]['max_abs_diff']:.2e}" if kind == "parallel" else "-"
            rows.append([f"{b} {kind}", str(r["nproc"]), r["layout"], f"{r['first_loss']:.6f}",
                         f"{r['last_loss']:.6f}", f"{r['tokens_per_s']:,.0f}", f"{r['wall_s']:.1f}", diff])
    w(format_table(rows, ["run", "procs", "layout", "first loss", "last loss", "tokens/s", "wall s",
                          "max |loss - ref|"]))
    w()
    for b, par in summary["parity"].items():
        w(f"parity {b}: {parity_words(par, cfg['steps'])}: "
          f"{'OK' if par['ok'] else 'FAILED'}")
    cross = summary["cross_backend"]
    if cross:
        w(f"torch vs mindspore (parallel runs): per-step |loss_torch - loss_mindspore| / |loss_torch| max "
          f"{cross['max_rel_diff']:.2e}, mean {cross['mean_rel_diff']:.2e} (absolute max {cross['max_abs_diff']:.2e});"
          f" target {cross['tolerance']:.0e}: {'OK' if cross['ok'] else 'FAILED'}")
        first, second = cross["backends"]
        w(f"{second} vs {first} tokens/s: " + ", ".join(
            f"{label} {_ratio_words(cross['speed_ratio'][kind])} "
            f"({summary['runs'][f'{second}/{kind}']['tokens_per_s']:,.0f} vs "
            f"{summary['runs'][f'{first}/{kind}']['tokens_per_s']:,.0f})"
            for kind, label in (("parallel", "parallel"), ("reference", "single process"))))
    w(f"wrote {png} and {js}")


def _ratio_words(ratio: float) -> str:
    """``0.08 -> "1/12.2"``, ``1.5 -> "1.50x"``: a speed ratio as people say it."""
    return f"1/{1 / ratio:.1f}" if 0 < ratio < 1 else f"{ratio:.2f}x"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hyper-parallel demo`` (and ``python -m hyper_parallel.demo``); returns the exit code."""
    try:
        args, runs = plan(argv)
    except C.DemoInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    from hyper_parallel.demo.report import json_dump, plot

    t0 = time.monotonic()
    results = {}
    try:
        for kind, spec in runs:
            results[f"{spec.backend}/{kind}"] = run_one(spec, kind, args.out, args.timeout)
    except _RunFailed as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # the launcher has stopped every rank on its way out
        print(f"\n{PROG}: interrupted; every rank was stopped", file=sys.stderr)
        return 130
    summary = summarize(runs, results)
    if args.resume:
        history = _read_history(args.resume)
        summary["resumed"] = {"dir": args.resume, "step": history["step"], "backend": history["backend"],
                              "layout": history["layout"], "history": history["losses"]}
    if args.save:
        b = summary["backends"][0]
        before = summary.get("resumed") or {"step": 0, "history": {"parallel": [], "reference": []}}
        json_dump(os.path.join(args.save, HISTORY), {
            "model": dataclasses.asdict(runs[0][1].model), "step": before["step"] + args.steps, "backend": b,
            "layout": summary["config"]["layout"],
            "losses": {kind: before["history"][kind] + results[f"{b}/{kind}"]["losses"]
                       for kind in ("parallel", "reference")}})
    png, js = os.path.join(args.out, "demo.png"), os.path.join(args.out, "summary.json")
    summary["wall_s"] = time.monotonic() - t0
    summary["files"] = {"png": png, "json": js}
    plot(png, summary)
    json_dump(js, summary)
    print_summary(summary, png, js)
    if not summary["ok"]:
        print(f"{PROG}: FAILED: a loss curve is outside its limit (see above)", file=sys.stderr)
        return 1
    return 0
