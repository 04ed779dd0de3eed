"""``hyper-parallel bench``: the quick sweep end to end (tables, JSON, every ratio finite and positive), argument
errors, the formatting and reference helpers, and the shared progress line and table formatter it prints with
(:mod:`hyper_parallel._console`, which the demo uses too)."""

from __future__ import annotations

import io
import json
import math
import os

import pytest

from hyper_parallel import _console, bench
from hyper_parallel.bench import cli as bench_cli
from hyper_parallel.testing import RankError


def _installed() -> list[str]:
    from hyper_parallel._select import available_backends

    found = available_backends()
    return [b for b in ("torch", "mindspore") if found.get(b)]


def test_quick_bench_prints_tables_and_writes_json(tmp_path, capsys):
    backends = _installed()
    if not backends:
        pytest.skip("no framework installed")
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["meta"]["backends"] == backends
    assert report["meta"]["command"] == f"hyper-parallel bench --quick --json {out} --no-progress"
    assert set(report["meta"]["versions"]) == set(backends)
    assert report["meta"]["omp_num_threads_per_rank"] == (os.environ.get("OMP_NUM_THREADS") or "1")
    assert [(r["tokens"], r["ranks"], r["local_experts"]) for r in report["permute"]] == bench.QUICK.permute_cells()
    assert [(r["nproc"], r["tokens_per_rank"]) for r in report["dispatch"]] == [
        (n, t) for n in bench.QUICK.dispatch_nprocs for t in bench.QUICK.dispatch_tokens]
    for row in report["permute"]:
        for b in backends:
            assert set(row["seconds"][b]) == {"vectorized", "loop"}
    for row in report["dispatch"]:
        assert row["bytes_per_rank"] == row["tokens_per_rank"] * bench.HIDDEN * 4
        for b in backends:
            assert set(row["seconds"][b]) == {"dispatch_combine", "raw_all_to_all"}
    for row in report["permute"] + report["dispatch"]:
        assert all(s > 0 and math.isfinite(s) for b in backends for s in row["seconds"][b].values()), row

    ratios = list(bench.iter_ratios(report))
    per_row = 1 if len(backends) == 1 else 4  # each backend's own ratio, plus two mindspore / torch ratios
    assert len(ratios) == per_row * (len(report["permute"]) + len(report["dispatch"]))
    bad = [(s, i, name, v) for s, i, name, v in ratios if not (isinstance(v, float) and math.isfinite(v) and v > 0)]
    assert not bad, bad
    if len(backends) == 2:
        assert {name for _, _, name, _ in ratios if name.startswith("mindspore/torch")} == {
            "mindspore/torch:vectorized", "mindspore/torch:loop", "mindspore/torch:dispatch_combine",
            "mindspore/torch:raw_all_to_all"}

    # The printed tables: a header, a rule and one line per row, each line with the same number of cells.
    assert "Permutation index build" in printed and "EP dispatch+combine" in printed
    tables = printed.split("\n\n")
    for block, rows in zip(tables, (report["permute"], report["dispatch"])):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len(lines) == 2 + len(rows)
        assert len({ln.count("|") for ln in lines}) == 1


@pytest.mark.parametrize("argv,message", [
    (["--backends", "jax"], "--backends 'jax': valid backends are ['torch', 'mindspore']"),
    (["--backends", " , "], "valid backends are"),
], ids=["unknown", "empty"])
def test_bad_backends_are_one_line_errors(argv, message, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_frameworks_are_reported(monkeypatch, capsys):
    import hyper_parallel._select as select

    monkeypatch.setattr(select, "available_backends", lambda: {"torch": False, "mindspore": False})
    assert bench.main([]) == 2
    assert "neither torch nor mindspore is installed" in capsys.readouterr().err
    assert bench.main(["--backends", "mindspore"]) == 2
    assert "names ['mindspore'], which is not installed" in capsys.readouterr().err


def test_a_failing_cell_is_reported_without_a_traceback(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RankError("_dispatch_cell failed on torch x2: ...")

    monkeypatch.setattr(bench_cli, "run", boom)  # where main looks it up
    assert bench.main(["--quick", "--backends", "torch"]) == 1
    assert "a benchmark cell failed: _dispatch_cell failed on torch x2" in capsys.readouterr().err


def _fake_report(backends):
    sec_p = {b: {"vectorized": 2e-4, "loop": 3e-2} for b in backends}
    sec_d = {b: {"dispatch_combine": 1.5, "raw_all_to_all": 0.0} for b in backends}
    return bench.build_report(backends, bench.QUICK, {(1024, 2, 4): sec_p}, {(2, 512): sec_d},
                         {b: {b: "1.0"} for b in backends}, 1.0)


def test_format_single_backend_and_extreme_values():
    report = _fake_report(["torch"])
    text = bench.format_report(report)
    assert "ms/torch" not in text
    assert "200 us" in text and "30 ms" in text and "1.5 s" in text  # each time unit
    assert " 150 |" in text  # loop / vectorized = 150: no decimals from 100 on
    assert report["dispatch"][0]["ratios"]["torch:dispatch_combine/raw"] == math.inf  # a zero baseline


def test_format_both_backends():
    text = bench.format_report(_fake_report(["torch", "mindspore"]))
    assert "ms/torch vec" in text and "ms/torch d+c" in text


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_and_terminal_mode():
    plain = io.StringIO()
    bar = bench.progress_line(2, True, plain)
    bar.step("first")
    bar.step("second")
    bar.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and plain.getvalue().endswith("\n")  # a line per step off a terminal
    assert lines[0].startswith("bench [############............] 1/2  ") and lines[0].endswith("s  first")
    assert lines[1].startswith("bench [########################] 2/2  ") and lines[1].endswith("s  second")
    tty = _Tty()
    bar = bench.progress_line(1, True, tty)
    bar.step("only")
    bar.close()
    # redrawn in place, then erased: the tables follow on a clean line
    assert tty.getvalue().startswith("\r\033[Kbench [########################] 1/1  ") and "\n" not in tty.getvalue()
    assert tty.getvalue().endswith("s  only\r\033[K")
    quiet = io.StringIO()
    bench.progress_line(1, False, quiet).step("nothing")
    assert quiet.getvalue() == ""


def test_console_progress_spreads_log_lines_and_throttles_redraws():
    log = io.StringIO()
    bar = _console.Progress("run", 20, stream=log, width=4, log_lines=10)
    for done in range(1, 21):
        bar.update(done, f"step {done}")
    # the first step (the run has started), then a line each time 10 * done // 20 grows: every second step
    assert log.getvalue().splitlines() == [f"run [{'#' * round(d / 5)}{'.' * (4 - round(d / 5))}] {d:>2}/20  step {d}"
                                           for d in [1, *range(2, 21, 2)]]
    tty = _Tty()
    bar = _console.Progress("run", 3, stream=tty, width=3, min_redraw_s=60)
    for done in (1, 2, 3):
        bar.update(done, "x")
    bar.close()
    # the first draw and the last step only (the last one always), then kept on its own line
    assert tty.getvalue() == "\r\033[Krun [#..] 1/3  x\r\033[Krun [###] 3/3  x\r\033[Krun [###] 3/3  x\n"


@pytest.mark.parametrize("kwargs,message", [
    ({"total": 0}, "Progress: total must be an int >= 1, got 0"),
    ({"total": 3, "width": 0}, "Progress: width must be an int >= 1, got 0"),
    ({"total": 3, "log_lines": 0}, "log_lines must be None (a line per update) or an int >= 1, got 0"),
])
def test_console_progress_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError) as e:
        _console.Progress("run", **kwargs)
    assert message in str(e.value)


def test_console_table_plain_and_markdown():
    rows = [["torch", 1.5, "ok"], ["mindspore", 12, "-"]]
    assert _console.format_table(rows, ["run", "loss", "verdict"]) == "\n".join([
        "run        loss  verdict",
        "---------  ----  -------",
        "torch       1.5       ok",
        "mindspore    12        -"])
    assert _console.format_table(rows, ["run", "loss", "verdict"], align="lrl", markdown=True) == "\n".join([
        "| run       | loss | verdict |",
        "|:----------|-----:|:--------|",
        "| torch     |  1.5 | ok      |",
        "| mindspore |   12 | -       |"])
    assert _console.format_table([], ["a", "bb"], markdown=True) == "| a | bb |\n|:--|---:|"  # no rows
    with pytest.raises(ValueError, match=r"every row must have 2 cells like the header \['a', 'b'\], row 1 has 1"):
        _console.format_table([["1", "2"], ["3"]], ["a", "b"])
    with pytest.raises(ValueError, match=r"align must be 2 letters, each 'l' \(left\) or 'r' \(right\), got 'lc'"):
        _console.format_table([["1", "2"]], ["a", "b"], align="lc")


def test_counts_are_seeded_uneven_and_complete():
    counts = bench.counts_for(1000, 16, seed=3)
    assert sum(counts) == 1000 and len(counts) == 16 and min(counts) >= 0
    assert counts == bench.counts_for(1000, 16, seed=3) and len(set(counts)) > 1


@pytest.fixture()
def torch_platform():
    pytest.importorskip("torch")
    import hyper_parallel._select as select

    old = os.environ.get(select.ENV_VAR)
    os.environ[select.ENV_VAR] = "torch"
    select._reset_platform_for_tests()
    yield select.get_platform()
    select._reset_platform_for_tests()
    if old is None:
        os.environ.pop(select.ENV_VAR)
    else:
        os.environ[select.ENV_VAR] = old


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("counts,R,E", [([1, 2, 3, 0], 2, 2), ([0, 0, 5, 0, 2, 9], 3, 2), ([4], 1, 1)])
def test_loop_reference_matches_the_vectorized_build(torch_platform, counts, R, E, align):
    from hyper_parallel.expert_parallel.permute import build_permute_indices

    p = torch_platform
    want = build_permute_indices(p.tensor(counts, dtype="int64"), counts, R, E, align=align).source_row_P
    assert p.tolist(bench.permute_indices_loop(counts, R, E, align)) == p.tolist(want)
