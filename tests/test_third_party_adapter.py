"""A third-party adapter, registered through the real entry-point mechanism, runs the shipped conformance suite.

The adapter package is written to a temporary directory: ``toy_adapter.py`` (the torch adapter under the name
``toy_torch``, and ``toy_broken``, which sums wrongly in ``all_reduce`` and hangs in a bfloat16 ``broadcast``) plus a
``toy_adapter-0.1.dist-info/`` whose ``entry_points.txt`` registers both under ``hyper_parallel.platforms``. With the
directory on ``PYTHONPATH``, ``importlib.metadata`` finds the dist-info as it finds any installed distribution: no
mock. The runner and pytest then run as subprocesses, as a third party would run them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hyper_parallel.testing import run_conformance
from hyper_parallel.testing.conformance import main
from hyper_parallel.testing.conformance.suite import conformance_cases

pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER = '''"""A third-party adapter for the tests: the torch adapter under its own names."""
import time

from platform_adapters.torch import TorchPlatform


class ToyTorchPlatform(TorchPlatform):
    name = "toy_torch"


class BrokenPlatform(ToyTorchPlatform):
    name = "toy_broken"

    def _all_reduce(self, x, op, group):
        return super()._all_reduce(x, op, group) + 1  # wrong on purpose

    def _broadcast(self, x, src, group):
        if self.dtype_name(x.dtype) == "bfloat16" and self.get_rank() == src:
            time.sleep(3600)  # a hung collective
        return super()._broadcast(x, src, group)
'''
ENTRY_POINTS = """[hyper_parallel.platforms]
toy_torch = toy_adapter:ToyTorchPlatform
toy_broken = toy_adapter:BrokenPlatform
"""
LINE = re.compile(r"^(PASS|FAIL|SKIP)  x(\d)  (\S+)", re.MULTILINE)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The environment of a process that has the toy adapter distribution installed (on its ``sys.path``)."""
    site = tmp_path_factory.mktemp("site")
    (site / "toy_adapter.py").write_text(ADAPTER)
    info = site / "toy_adapter-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-adapter\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), REPO])}


def _runner(env: dict, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    out = subprocess.run([sys.executable, "-m", "hyper_parallel.testing.conformance", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=400)
    return out, {name: status for status, _, name in LINE.findall(out.stdout)}


def test_the_runner_passes_every_case_on_a_registered_adapter(env):
    out, status = _runner(env, "--backend", "TOY_TORCH", "--nproc", "2", "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    cases = conformance_cases()
    assert status == {c.name: "PASS" if c.runs_at(2) else "SKIP" for c in cases}, out.stdout
    assert "backend 'toy_torch' at 2 ranks: toy_adapter:ToyTorchPlatform ('toy_torch', cpu, gloo)" in out.stdout
    ran = sum(c.runs_at(2) for c in cases)
    assert f"toy_torch: {ran} passed, 0 failed, {len(cases) - ran} skipped at ranks [2] in " in out.stdout
    assert out.stdout.rstrip().endswith(": OK")


def test_a_broken_adapter_fails_the_run_naming_its_cases(env):
    out, status = _runner(env, "--backend", "toy_broken", "--nproc", "2", "--timeout", "8")
    assert out.returncode == 1, out.stdout + out.stderr
    failed = {name for name, s in status.items() if s == "FAIL"}
    assert {"all_reduce/int64", "all_reduce/float32", "all_reduce/bfloat16", "broadcast/bfloat16"} <= failed
    # the wrong sum is reported with the rank's traceback and the values that differ
    detail = out.stdout.split("FAIL  x2  all_reduce/float32", 1)[1].split("\nPASS", 1)[0]
    assert "--- rank 0 ---" in detail and "Traceback" in detail and "sum" in detail and "Mismatched" in detail
    # the hung broadcast times out; the world is restarted and the run goes on
    assert "did not answer within 8 s" in out.stdout
    assert {status[n] for n in status if n.startswith("all_to_all_single")} == {"PASS"}
    assert status["identity"] == status["broadcast/int64"] == status["local/factories"] == "PASS"
    recap = re.search(r"^failed: (.*)$", out.stdout, re.MULTILINE).group(1).split(", ")
    assert sorted(recap) == sorted(f"{name} x2" for name in failed)
    assert re.search(rf"toy_broken: \d+ passed, {len(failed)} failed, 2 skipped at ranks \[2\] in .*: FAILED$",
                     out.stdout.rstrip())


def test_conftest_accepts_a_registered_backend(env):
    """``HYPER_PARALLEL_TEST_BACKENDS`` takes an entry-point name; an unknown name still fails, listing the valid."""
    collect = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
               "tests/test_conformance.py"]
    out = subprocess.run(collect, env={**env, "HYPER_PARALLEL_TEST_BACKENDS": "toy_torch"}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = re.findall(r"::test_case\[(\w+)-x(\d)-", out.stdout)
    assert len(ids) == sum(c.runs_at(2) + c.runs_at(4) for c in conformance_cases()) == 86
    assert {backend for backend, _ in ids} == {"toy_torch"}
    out = subprocess.run(collect, env={**env, "HYPER_PARALLEL_TEST_BACKENDS": "toy_torch,nonsense"}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert re.search(r"unknown \['nonsense'\]; valid: \[[^]]*'mindspore', 'torch', 'torch_npu', 'toy_broken', "
                     r"'toy_torch'", out.stdout), out.stdout


def test_bad_arguments_are_refused_before_any_world_starts(capsys):
    with pytest.raises(ValueError, match=r"backend 'jax' is not a known backend; valid values: \[.*'torch'"):
        run_conformance("jax")
    with pytest.raises(TypeError, match=r"backend must be a str naming a backend, got int"):
        run_conformance(3)
    with pytest.raises(ValueError, match=r"nprocs must be world sizes in \[2, 3, 4\] .*, got \[2, 8\]"):
        run_conformance("torch", (2, 8))
    with pytest.raises(TypeError, match=r"nprocs must be ints, got \[2.5\]"):
        run_conformance("torch", [2.5])
    with pytest.raises(ValueError, match=r"timeout_s must be > 0 seconds, got 0"):
        run_conformance("torch", timeout_s=0)
    assert main(["--backend", "jax", "--nproc", "2"]) == 2
    assert "error: backend 'jax' is not a known backend" in capsys.readouterr().err
