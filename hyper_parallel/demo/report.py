"""The demo's output: the progress bar, the summary table (both drawn by :mod:`hyper_parallel._console`), the
JSON summary and the PNG.

Framework-free: it only sees the per-step records the ranks print (see :mod:`hyper_parallel.demo.train`).
"""

from __future__ import annotations

import json
import math
import sys
import threading

from hyper_parallel._console import Progress, format_table
from hyper_parallel.demo.train import RECORD_PREFIX

# format_table is the shared one, re-exported: the driver prints its summary table with it
__all__ = ["ProgressBar", "RecordSink", "tokens_per_second", "max_abs_diff", "rel_diffs", "format_table", "plot",
           "json_dump"]


class ProgressBar:
    """The demo's progress line on ``stream`` (stderr): step, loss, tokens/s, drawn by :class:`Progress`.

    On a terminal it redraws in place (at most 10 times a second); otherwise (CI logs, pipes) it prints a line at
    every 10% of the run, so logs stay short.
    """

    def __init__(self, label: str, total: int, tokens_per_step: int, stream=None, width: int = 24,
                 enabled: bool = True):
        self.tokens = tokens_per_step
        self.rate: float | None = None
        self._bar = Progress(label, total, stream=stream, enabled=enabled, width=width, log_lines=10,
                             min_redraw_s=0.1, keep=True)

    def update(self, step: int, loss: float, time_s: float) -> None:
        if step > 0 or self._bar.total == 1:  # step 0 carries the warm-up: not a rate
            self.rate = self.tokens / max(time_s, 1e-9)
        rate = "-" if self.rate is None else f"{self.rate:,.0f}"
        self._bar.update(step + 1, f"loss {loss:.6f}  {rate} tok/s")

    def clear_line(self) -> None:
        """Make room for a message above the bar (terminal only)."""
        self._bar.clear_line()

    def close(self) -> None:
        self._bar.close()


class RecordSink:
    """The launcher's output stream for one run: records from rank 0 feed the bar and the results, every rank's
    ``memory`` records are collected in :attr:`memory`, every other line (warnings, a failing rank's traceback) is
    shown on ``stream`` above the bar."""

    def __init__(self, bar: ProgressBar, stream=None):
        self.bar, self.stream = bar, stream or sys.stderr
        self.steps: list[dict] = []
        self.memory: list[dict] = []
        self.start: dict | None = None
        self._buf = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buf += text
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self._line(line)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def _line(self, line: str) -> None:
        _, sep, payload = line.partition(RECORD_PREFIX)
        if sep:
            rec = json.loads(payload)
            if rec["event"] == "start":
                self.start = rec
            elif rec["event"] == "memory":
                self.memory.append(rec)
            else:
                self.steps.append(rec)
                self.bar.update(rec["step"], rec["loss"], rec["time_s"])
            return
        self.bar.clear_line()
        self.stream.write(line + "\n")
        self.stream.flush()


def tokens_per_second(steps: list[dict], tokens_per_step: int) -> float:
    """Steady-state throughput: tokens over time, leaving out step 0 (warm-up) when there are later steps."""
    timed = steps[1:] if len(steps) > 1 else steps
    return tokens_per_step * len(timed) / max(sum(s["time_s"] for s in timed), 1e-9)


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def rel_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b)]


def plot(path: str, summary: dict) -> None:
    """The PNG: loss curves (parallel vs reference, and the other backend under --compare-backends) over the
    per-step differences on a log scale; beside them the per-expert token load of the parallel run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec
    from matplotlib.ticker import MaxNLocator

    runs = summary["runs"]
    cfg = summary["config"]
    backends = summary["backends"]
    first = backends[0]
    resumed = summary.get("resumed")  # a run continued from a checkpoint: the saved curve comes first
    start = resumed["step"] if resumed else 0
    steps = list(range(start + 1, start + len(runs[f"{first}/parallel"]["losses"]) + 1))
    colors = {"torch": "#1f77b4", "mindspore": "#d62728"}

    fig = plt.figure(figsize=(15, 7.6), dpi=110)
    gs = GridSpec(2, 2, figure=fig, width_ratios=[1.05, 1], height_ratios=[2.2, 1], hspace=0.08, wspace=0.18,
                  left=0.06, right=0.97, top=0.85, bottom=0.2)
    ax_loss = fig.add_subplot(gs[0, 0])
    ax_diff = fig.add_subplot(gs[1, 0], sharex=ax_loss)
    ax_load = fig.add_subplot(gs[:, 1])

    for b in backends:
        par, ref = runs[f"{b}/parallel"], runs[f"{b}/reference"]
        c = colors.get(b, "#2ca02c")
        # the first backend's line is drawn wider, so a second one on top of it leaves it visible at the edges
        ax_loss.plot(steps, par["losses"], color=c, lw=3.2 if b == first else 1.5,
                     label=f"{b}: parallel, {par['nproc']} procs ({par['layout']})")
        ax_loss.plot(steps, ref["losses"], color="black" if b == first else "#555555", lw=1.1,
                     ls="--" if b == first else ":", label=f"{b}: single-process reference")
    if resumed:  # one curve: the saved run's steps, a marker where this run resumed, then this run's
        history = resumed["history"]
        before = list(range(1, start + 1))
        ax_loss.plot(before + steps[:1], history["parallel"] + runs[f"{first}/parallel"]["losses"][:1],
                     color="#7f7f7f", lw=2.2, label=f"saved run ({resumed['backend']}, {resumed['layout']})")
        ax_loss.plot([start + 1], runs[f"{first}/parallel"]["losses"][:1], marker="D", ms=9, color="#ff7f0e",
                     ls="none", label=f"resumed at step {start + 1} from {resumed['dir']}")
    ax_loss.set_ylabel("training loss (MSE to teacher)")
    ax_loss.set_title("Loss: parallel run vs single-process reference (same seed, same global batch)",
                      fontsize=11, loc="left")
    ax_loss.legend(loc="upper right", fontsize=9, framealpha=0.9)
    ax_loss.grid(alpha=0.3)
    plt.setp(ax_loss.get_xticklabels(), visible=False)

    def dots(ax, values, color, label, marker="o"):
        # exact zeros have no place on a log axis: they are counted in the legend instead
        pts = [(s, v) for s, v in zip(steps, values) if v > 0]
        zeros = len(values) - len(pts)
        note = f"; exactly 0 at {zeros} of {len(values)} steps, not drawn" if zeros else ""
        ax.plot([s for s, _ in pts], [v for _, v in pts], ls="none", marker=marker, ms=3, color=color,
                label=label + note)

    for b in backends:
        par = summary["parity"][b]
        dots(ax_diff, par["per_step_abs_diff"], colors.get(b, "#2ca02c"),
             f"{b}: |loss parallel - loss reference| (max {par['max_abs_diff']:.1e})")
        if par.get("routing_split_step") is not None:  # a routing tie decided differently: see loss_parity
            ax_diff.axvline(steps[par["routing_split_step"]], color=colors.get(b, "#2ca02c"), ls=":", lw=1.2,
                            label=f"{b}: routing differs from here (a tie; the limit holds before it)")
    ax_diff.axhline(summary["parity"][first]["tolerance"], color="black", ls="--", lw=1,
                    label=f"limit {summary['parity'][first]['tolerance']:.0e} for parallel vs reference (absolute)")
    cross = summary.get("cross_backend")
    if cross:
        dots(ax_diff, cross["per_step_rel_diff"], "#9467bd",
             f"torch vs mindspore: |loss_t - loss_m| / |loss_t| (max {cross['max_rel_diff']:.1e})", marker="s")
        ax_diff.axhline(cross["tolerance"], color="#9467bd", ls=":", lw=1.2,
                        label=f"target {cross['tolerance']:.0e} for torch vs mindspore (relative)")
    ax_diff.set_yscale("log")
    ax_diff.set_ylim(1e-10, 1e-2)
    ax_diff.set_xlabel("training step")
    ax_diff.set_ylabel("loss difference")
    ax_diff.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_diff.legend(loc="upper left", bbox_to_anchor=(0.0, -0.32), fontsize=8, ncol=1, frameon=False)
    ax_diff.grid(alpha=0.3, which="major")

    load = runs[f"{first}/parallel"]["load"]  # [steps][layers * experts] pairs per expert
    L, E = cfg["layers"], cfg["experts"]
    pairs_per_layer = cfg["tokens"] * cfg["top_k"]
    grid = [[100.0 * load[s][r] / pairs_per_layer for s in range(len(load))] for r in range(L * E)]
    fair = 100.0 / E
    vmax = max(2 * fair, max(max(row) for row in grid))
    im = ax_load.imshow(grid, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=0, vmax=vmax,
                        extent=(0.5, len(load) + 0.5, L * E - 0.5, -0.5))
    for i in range(1, L):
        ax_load.axhline(i * E - 0.5, color="black", lw=1.5)
    ax_load.set_yticks([i * E + e for i in range(L) for e in range(E)])
    ax_load.set_yticklabels([f"L{i} e{e}" for i in range(L) for e in range(E)], fontsize=7)
    ax_load.set_xlabel("training step")
    ax_load.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_load.set_ylabel("MoE layer / expert")
    ax_load.set_title(f"Per-expert token load ({first} parallel run; balanced = {fair:.1f}%, white)", fontsize=11,
                      loc="left")
    cbar = fig.colorbar(im, ax=ax_load, fraction=0.05, pad=0.02)
    cbar.set_label("share of the layer's routed tokens (%)")
    im.set_norm(matplotlib.colors.TwoSlopeNorm(vcenter=fair, vmin=0, vmax=vmax))

    title = (f"hyper-parallel demo: {L} MoE layers x {E} experts (top-{cfg['top_k']}, "
             f"{cfg['shared_experts']} shared), {cfg['tokens']} tokens/step, seed {cfg['seed']}")
    verdict = "   ".join(f"{b}: max |parallel - reference| = {summary['parity'][b]['max_abs_diff']:.1e} "
                           f"({'OK' if summary['parity'][b]['ok'] else 'FAIL'})" for b in backends)
    if cross:
        verdict += (f"   torch vs mindspore: max rel diff = {cross['max_rel_diff']:.1e} "
                    f"({'OK' if cross['ok'] else 'FAIL'})")
    fig.suptitle(title, fontsize=13, x=0.06, ha="left", y=0.975)
    fig.text(0.06, 0.918, verdict, fontsize=10, ha="left", color="#1a7f37" if summary["ok"] else "#c62828")
    fig.savefig(path)
    plt.close(fig)


def json_dump(path: str, summary: dict) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    with open(path, "w") as f:
        json.dump(clean(summary), f, indent=1)
        f.write("\n")
