"""Tests of the local launcher, ``python -m hyper_parallel.launch``.

Most tests run the launcher as a real subprocess, exactly as a user would, on tiny plain-Python scripts written to
``tmp_path``: no deep-learning framework is imported, so each run takes well under a second. A few tests call
:func:`hyper_parallel.launch.launch` and :func:`hyper_parallel.launch.main` in-process, for the validation paths
and for coverage.

"Sleeps forever" in these scripts means ``time.sleep(SLEEP_FOREVER_S)``; every assertion on wall time is far below
it, so a launcher that failed to stop a rank would be caught rather than waited out.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hyper_parallel import launch
from tests.processes import assert_all_gone

REPO = Path(__file__).resolve().parents[1]
SLEEP_FOREVER_S = 120
# What "stopped quickly" means: start-up of a few plain Python processes on a 2-core machine plus the launcher's
# SIGTERM handling. Far below SLEEP_FOREVER_S, far above any honest run.
QUICK_S = 30
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "HYPER_PARALLEL_PLATFORM", "PYTHONUNBUFFERED")

pytestmark = pytest.mark.timeout(180)


# ---------------------------------------------------------------- helpers
def _env() -> dict:
    """The launcher's environment: the repo importable, and no inherited backend choice."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("HYPER_PARALLEL_PLATFORM", None)
    return env


def _launch(*args, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run the launcher to completion; return the finished process and its wall time in seconds."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hyper_parallel.launch", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _env_script(tmp_path: Path) -> Path:
    """A rank that reports its launcher variables and argv as one JSON line, plus one line on stderr."""
    return _script(tmp_path, "report_env.py", f"""
        import json, os, sys
        print("ENV " + json.dumps({{k: os.environ.get(k) for k in {ENV_KEYS!r}}} | {{"argv": sys.argv[1:]}}))
        print("to stderr", file=sys.stderr)
    """)


def _reports(stdout: str) -> dict[int, dict]:
    """Parse the ``[rank i] ENV {...}`` lines; fail on a rank that reported twice."""
    reports: dict[int, dict] = {}
    for m in re.finditer(r"^\[rank (\d+)\] ENV (.*)$", stdout, flags=re.M):
        rank = int(m.group(1))
        assert rank not in reports, f"rank {rank} reported twice:\n{stdout}"
        reports[rank] = json.loads(m.group(2))
    return reports


def _orphan_script(tmp_path: Path) -> Path:
    """Every rank spawns a grandchild ``sleep 300`` and records both pids in ``<dir>/<rank>.json``.

    ``argv[2]`` picks what happens next: ``fail`` makes the last rank exit 5 once every rank has recorded its pids
    (so the launcher must clean up a full world); anything else makes every rank sleep forever.
    """
    return _script(tmp_path, "spawn_grandchild.py", f"""
        import json, os, subprocess, sys, time
        from pathlib import Path

        out, mode = Path(sys.argv[1]), sys.argv[2]
        rank, nproc = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        child = subprocess.Popen(["sleep", "300"])
        tmp = out / f".{{rank}}.tmp"
        tmp.write_text(json.dumps({{"rank_pid": os.getpid(), "child_pid": child.pid}}))
        os.replace(tmp, out / f"{{rank}}.json")  # atomic: a reader never sees half a file
        print("spawned", child.pid, flush=True)
        if mode == "fail" and rank == nproc - 1:
            deadline = time.monotonic() + 60
            while len(list(out.glob("*.json"))) < nproc and time.monotonic() < deadline:
                time.sleep(0.02)
            sys.exit(5)
        time.sleep({SLEEP_FOREVER_S})
    """)


def _recorded_pids(pid_dir: Path, nproc: int) -> list[int]:
    files = sorted(pid_dir.glob("*.json"))
    assert len(files) == nproc, f"expected {nproc} pid files, found {[f.name for f in files]}"
    pids = []
    for f in files:
        data = json.loads(f.read_text())
        pids += [data["rank_pid"], data["child_pid"]]
    return pids


def _gone(pids: list[int], within_s: float = 5.0) -> None:
    assert_all_gone(pids, within_s, what="processes still running after the launcher exited (orphans)")


def _wait_for_files(directory: Path, pattern: str, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(directory.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"only {list(directory.glob(pattern))} appeared in {timeout_s} s"
        time.sleep(0.05)


# ---------------------------------------------------------------- unit tests of the helpers
def test_free_port_is_bindable():
    port = launch.free_port()
    assert isinstance(port, int) and 1024 <= port <= 65535
    # "free a moment ago": binding it right away must work.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_world_env(monkeypatch):
    monkeypatch.setenv("HYPER_PARALLEL_TEST_MARKER", "kept")
    monkeypatch.delenv("HYPER_PARALLEL_PLATFORM", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    env = launch.world_env(2, 4, 12345)
    assert {k: env[k] for k in ENV_KEYS if k in env} == {
        "RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "12345", "PYTHONUNBUFFERED": "1"}
    assert "HYPER_PARALLEL_PLATFORM" not in env  # only set when a backend is given
    assert env["HYPER_PARALLEL_TEST_MARKER"] == "kept"  # the rest of os.environ is inherited...
    assert "RANK" not in os.environ  # ...as a copy: os.environ itself is untouched

    env = launch.world_env(0, 1, 80, backend="torch", addr="10.0.0.7")
    assert (env["HYPER_PARALLEL_PLATFORM"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("torch", "10.0.0.7", "80")


def test_stop_process_tree_kills_group_and_escalates_to_sigkill(tmp_path):
    """A process that ignores SIGTERM is SIGKILLed after the grace period, and its child dies with it."""
    pid_file = tmp_path / "child.pid"
    script = _script(tmp_path, "stubborn.py", f"""
        import os, signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "300"])
        open({str(pid_file)!r} + ".tmp", "w").write(str(child.pid))
        os.replace({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
        time.sleep({SLEEP_FOREVER_S})
    """)
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        _wait_for_files(tmp_path, "child.pid", 1)
        start = time.monotonic()
        launch.stop_process_tree(proc, grace_s=0.5)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL  # SIGTERM was ignored, so only SIGKILL can have ended it
    assert 0.5 <= elapsed < QUICK_S
    _gone([proc.pid, int(pid_file.read_text())])


# ---------------------------------------------------------------- (a) successful worlds
@pytest.mark.parametrize("nproc", [2, 4])
def test_ranks_get_the_standard_environment(tmp_path, nproc):
    proc, _ = _launch("--nproc", nproc, _env_script(tmp_path), "--flag", "value")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every output line, stderr of the ranks included, carries its rank prefix.
    lines = proc.stdout.splitlines()
    assert lines and all(re.match(r"\[rank \d+\] ", line) for line in lines), proc.stdout
    assert sorted(lines.count(f"[rank {r}] to stderr") for r in range(nproc)) == [1] * nproc

    reports = _reports(proc.stdout)
    assert sorted(reports) == list(range(nproc))
    port = reports[0]["MASTER_PORT"]
    assert port.isdigit() and 0 < int(port) < 65536
    for rank, env in reports.items():
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                       "HYPER_PARALLEL_PLATFORM": None, "PYTHONUNBUFFERED": "1",
                       "argv": ["--flag", "value"]}  # arguments after the script reach it untouched


@pytest.mark.parametrize("spelling", ["torch", "TORCH"])
def test_backend_sets_platform_variable(tmp_path, spelling):
    proc, _ = _launch("--nproc", 2, "--backend", spelling, _env_script(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = _reports(proc.stdout)
    assert [reports[r]["HYPER_PARALLEL_PLATFORM"] for r in sorted(reports)] == ["torch", "torch"]


# ---------------------------------------------------------------- (b) a failing rank
@pytest.mark.parametrize("how, code", [("raise", 1), ("exit3", 3)])
def test_failing_rank_stops_the_world(tmp_path, how, code):
    script = _script(tmp_path, "fail.py", f"""
        import os, sys, time
        if os.environ["RANK"] == "1":
            print("rank one is about to fail")
            if sys.argv[1] == "raise":
                raise RuntimeError("deliberate failure on rank 1")
            sys.exit(3)
        time.sleep({SLEEP_FOREVER_S})
    """)
    proc, elapsed = _launch("--nproc", 3, script, how)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert elapsed < QUICK_S, f"the sleeping ranks were not stopped promptly ({elapsed:.1f} s)"
    assert "[rank 1] rank one is about to fail" in proc.stdout
    head, sep, tail = proc.stdout.partition(f"hyper_parallel.launch: rank 1 failed with exit code {code}")
    assert sep, proc.stdout
    # The failing rank's last output is shown again after the summary, so the cause is the last thing on screen.
    assert "  | rank one is about to fail" in tail
    if how == "raise":
        assert "  | Traceback (most recent call last):" in tail
        assert "  | RuntimeError: deliberate failure on rank 1" in tail
        assert tail.index("Traceback") < tail.index("RuntimeError: deliberate failure")


# ---------------------------------------------------------------- (c) timeout
def test_timeout_stops_every_rank(tmp_path):
    script = _script(tmp_path, "sleep.py", f"import time; print('sleeping'); time.sleep({SLEEP_FOREVER_S})\n")
    proc, elapsed = _launch("--nproc", 2, "--timeout", 2, script)
    assert proc.returncode == launch.TIMEOUT_EXIT_CODE == 124, proc.stdout + proc.stderr
    assert "hyper_parallel.launch: timed out after 2 s; all 2 ranks were stopped." in proc.stdout
    assert 2 <= elapsed < QUICK_S


# ---------------------------------------------------------------- (d) no orphans
def test_no_orphans_after_a_rank_fails(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    proc, elapsed = _launch("--nproc", 3, _orphan_script(tmp_path), pid_dir, "fail")
    # Checked first, so a failing run still kills what it leaked. This includes the failed rank's own grandchild,
    # which outlived its parent inside the rank's process group.
    _gone(_recorded_pids(pid_dir, 3))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "rank 2 failed with exit code 5" in proc.stdout
    assert elapsed < QUICK_S


def test_no_orphans_after_a_timeout(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    proc, elapsed = _launch("--nproc", 2, "--timeout", 3, _orphan_script(tmp_path), pid_dir, "sleep")
    _gone(_recorded_pids(pid_dir, 2))
    assert proc.returncode == 124, proc.stdout + proc.stderr
    assert "timed out" in proc.stdout
    assert elapsed < QUICK_S


# ---------------------------------------------------------------- (e) SIGTERM to the launcher
def test_sigterm_to_the_launcher_stops_every_rank(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hyper_parallel.launch", "--nproc", "2", str(_orphan_script(tmp_path)), str(pid_dir),
         "sleep"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Every rank has spawned its grandchild, so the launcher is past start-up and supervising.
        _wait_for_files(pid_dir, "*.json", 2)
        launcher.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, _ = launcher.communicate(timeout=QUICK_S)
        elapsed = time.monotonic() - start
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    _gone(_recorded_pids(pid_dir, 2))
    assert launcher.returncode == 143, out  # 128 + SIGTERM: the launcher turned the signal into a clean exit
    assert elapsed < QUICK_S


# ---------------------------------------------------------------- (e2) SIGKILL to the launcher
def test_sigkill_to_the_launcher_leaves_no_rank_behind(tmp_path):
    """A SIGKILLed launcher cannot clean up: the kernel's parent-death signal stops the ranks, and the launcher's
    watchdog their process groups (the grandchildren)."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hyper_parallel.launch", "--nproc", "2", str(_orphan_script(tmp_path)), str(pid_dir),
         "sleep"], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_files(pid_dir, "*.json", 2)
        launcher.kill()
        launcher.wait(QUICK_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == -signal.SIGKILL
    _gone(_recorded_pids(pid_dir, 2), within_s=5.0)


def test_parent_death_signal_stops_a_child_when_its_parent_is_sigkilled():
    """The kernel's half of the above, alone: no watchdog, and the child shares its parent's process group."""
    code = ("import subprocess, time; from hyper_parallel.launch import parent_death_signal; "
            "child = subprocess.Popen(['sleep', '300'], preexec_fn=parent_death_signal()); "
            f"print(child.pid, flush=True); time.sleep({SLEEP_FOREVER_S})")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    _gone([child], within_s=5.0)


# ---------------------------------------------------------------- (e3) the ranks' process-group timeouts
def test_pg_and_start_timeouts_reach_every_rank(tmp_path):
    script = _script(tmp_path, "timeouts.py", """
        import json, os
        print("ENV " + json.dumps({k: os.environ.get(k) for k in ("HYPER_PARALLEL_TIMEOUT",
                                                                  "HYPER_PARALLEL_START_TIMEOUT")}))
    """)
    proc, _ = _launch("--nproc", 2, "--pg-timeout", 7.5, "--start-timeout", 20, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = _reports(proc.stdout)
    assert reports == {r: {"HYPER_PARALLEL_TIMEOUT": "7.5", "HYPER_PARALLEL_START_TIMEOUT": "20"} for r in (0, 1)}


def test_launcher_refuses_bad_timeouts_before_starting_anything(tmp_path, capsys, monkeypatch):
    script = _script(tmp_path, "never.py", "raise SystemExit('a rank was started')\n")
    monkeypatch.delenv("HYPER_PARALLEL_START_TIMEOUT", raising=False)
    monkeypatch.setenv("HYPER_PARALLEL_TIMEOUT", "soon")  # inherited by the ranks: checked once, here
    assert launch.main(["--nproc", "2", str(script)]) == 2
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", "hyper_parallel.launch: error: HYPER_PARALLEL_TIMEOUT must be a positive, "
                                      "finite number of seconds (such as 600), got 'soon'\n")
    # the flag replaces the variable, and is checked itself
    assert launch.main(["--nproc", "2", "--pg-timeout", "0", str(script)]) == 2
    assert capsys.readouterr().err == ("hyper_parallel.launch: error: --pg-timeout must be a positive, finite number "
                                       "of seconds, got 0.0\n")
    monkeypatch.delenv("HYPER_PARALLEL_TIMEOUT")
    assert launch.main(["--nproc", "2", "--start-timeout", "-1", str(script)]) == 2
    assert capsys.readouterr().err == ("hyper_parallel.launch: error: --start-timeout must be a positive, finite "
                                       "number of seconds, got -1.0\n")


# ---------------------------------------------------------------- (f) bad input
def test_cli_rejects_nproc_zero(tmp_path):
    proc, _ = _launch("--nproc", 0, _env_script(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""  # nothing was started
    lines = proc.stderr.strip().splitlines()
    assert lines == ["hyper_parallel.launch: error: --nproc must be a positive integer, got 0"], proc.stderr


def test_cli_rejects_unknown_backend(tmp_path):
    proc, _ = _launch("--nproc", 2, "--backend", "nope", _env_script(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hyper_parallel.launch: error: "), proc.stderr
    assert "'nope'" in lines[0]
    valid = re.search(r"valid values: \[(.*)\]", lines[0])
    assert valid, proc.stderr
    assert {"'torch'", "'torch_npu'", "'mindspore'"} <= {v.strip() for v in valid.group(1).split(",")}


@pytest.mark.parametrize("kwargs, message", [
    ({"script_and_args": ["x.py"], "nproc": 0}, r"--nproc must be a positive integer, got 0$"),
    ({"script_and_args": ["x.py"], "nproc": -3}, r"got -3$"),
    ({"script_and_args": ["x.py"], "nproc": 2.0}, r"--nproc must be a positive integer, got 2\.0$"),
    ({"script_and_args": ["x.py"], "nproc": 2, "timeout_s": 0},
     r"--timeout must be a positive, finite number of seconds, got 0$"),
    ({"script_and_args": ["x.py"], "nproc": 2, "timeout_s": -1.5}, r"got -1\.5$"),
    ({"script_and_args": ["x.py"], "nproc": 2, "timeout_s": float("nan")}, r"got nan$"),
    ({"script_and_args": [], "nproc": 2}, r"^no script given"),
])
def test_launch_validates_before_starting_anything(kwargs, message):
    out = io.StringIO()
    with pytest.raises(ValueError, match=message):
        launch.launch(out=out, **kwargs)
    assert out.getvalue() == ""


# ---------------------------------------------------------------- in-process runs (coverage of the supervisor)
def test_main_in_process_one_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYPER_PARALLEL_PLATFORM", raising=False)
    assert launch.main(["--nproc", "1", "--backend", "Torch", str(_env_script(tmp_path)), "a"]) == 0
    reports = _reports(capsys.readouterr().out)
    assert list(reports) == [0]
    assert (reports[0]["WORLD_SIZE"], reports[0]["HYPER_PARALLEL_PLATFORM"], reports[0]["argv"]) == ("1", "torch",
                                                                                                        ["a"])


@pytest.mark.parametrize("argv, fragment", [
    (["--nproc", "0", "x.py"], "--nproc must be a positive integer, got 0"),
    (["--nproc", "1", "--timeout", "0", "x.py"], "--timeout must be a positive, finite number of seconds, got 0"),
    (["--nproc", "1", "--backend", "nope", "x.py"], "valid values"),
])
def test_main_in_process_bad_input(argv, fragment, capsys):
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyper_parallel.launch: error: ") and fragment in err


def test_launch_in_process_failure_and_timeout(tmp_path):
    fail = _script(tmp_path, "fail.py", f"""
        import os, sys, time
        if os.environ["RANK"] == "0":
            sys.exit(4)
        time.sleep({SLEEP_FOREVER_S})
    """)
    out = io.StringIO()
    start = time.monotonic()
    assert launch.launch([str(fail)], 2, out=out) == 4
    assert time.monotonic() - start < QUICK_S
    assert "rank 0 failed with exit code 4; the other ranks were stopped" in out.getvalue()

    sleep = _script(tmp_path, "sleep.py", f"import time; time.sleep({SLEEP_FOREVER_S})\n")
    out = io.StringIO()
    assert launch.launch([str(sleep)], 2, timeout_s=1, out=out) == 124
    assert "timed out after 1 s; all 2 ranks were stopped" in out.getvalue()


def test_rank_killed_by_a_signal_exits_128_plus_signal(tmp_path):
    script = _script(tmp_path, "kill.py", """
        import os, signal
        if os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc, _ = _launch("--nproc", 2, "--timeout", 60, script)
    assert proc.returncode == 128 + signal.SIGKILL, proc.stdout
    assert "rank 1 failed with exit code -9" in proc.stdout
