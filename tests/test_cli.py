"""The INSTALLED ``hyper-parallel`` console script, run as a user runs it: the executable that pip put next to this
Python (``ci/setup.sh`` installs the package into the test environment), from a directory outside the checkout and
with no ``PYTHONPATH``, so only the installed entry point can answer.

``ci/wheel.sh`` does the same from a built wheel in a fresh environment with torch only.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hyper_parallel

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "hyper-parallel"
DIST_BACKENDS = {"torch": "gloo", "mindspore": "mccl"}
FRAMEWORK_DISTRIBUTIONS = {"torch": "torch", "mindspore": "mindspore"}

pytestmark = pytest.mark.timeout(300)


def _run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    if not SCRIPT.is_file():
        pytest.fail(f"the hyper-parallel console script is not installed next to {sys.executable} (expected "
                    f"{SCRIPT}): pip install -e . (ci/setup.sh does)")
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYPER_PARALLEL_PLATFORM")}
    full_env.update(GLOG_v="3", **env)
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=240)


def test_version_is_the_single_source(tmp_path):
    out = _run("--version", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hyper_parallel.__version__
    # the installed metadata carries the same version: pyproject.toml reads it from hyper_parallel.__version__
    assert importlib.metadata.version("hyper-parallel") == hyper_parallel.__version__


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_declares_the_version_dynamic_and_the_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"], "the version is written once, in hyper_parallel/__init__.py"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hyper_parallel.__version__"}
    # numpy is a runtime dependency (the layers need it), a range; the frameworks come through extras
    assert [d for d in project["project"]["dependencies"] if d.startswith("numpy")] == ["numpy>=1.22"]
    extras = project["project"]["optional-dependencies"]
    assert {"torch", "mindspore", "demo", "test"} <= set(extras)
    assert extras["torch"] == ["torch>=2.4"]
    assert "numpy<2" in extras["mindspore"]
    assert any(d.startswith("matplotlib") for d in extras["demo"])


@pytest.mark.backends("torch", "mindspore")
def test_info_json_names_the_backend(backend, tmp_path):
    out = _run("info", "--json", cwd=tmp_path, HYPER_PARALLEL_PLATFORM=backend)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["backend"]["name"] == backend
    assert data["backend"]["device_type"] == "cpu"
    assert data["backend"]["dist_backend"] == DIST_BACKENDS[backend]
    assert data["hyper_parallel"] == hyper_parallel.__version__
    assert Path(data["hyper_parallel_path"]).resolve() == Path(hyper_parallel.__file__).resolve().parent
    assert data["adapters_importable"][backend] is True
    assert data["frameworks"][backend] == importlib.metadata.version(FRAMEWORK_DISTRIBUTIONS[backend])
    assert data["world_env"] == {"HYPER_PARALLEL_PLATFORM": backend}


def test_info_text(tmp_path):
    out = _run("info", cwd=tmp_path, HYPER_PARALLEL_PLATFORM="torch", RANK="3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"hyper_parallel    {hyper_parallel.__version__} (python ")
    assert "backend           torch on cpu, collectives via gloo" in out.stdout
    assert "RANK=3" in out.stdout


def test_info_with_an_unknown_backend_exits_2_and_says_why(tmp_path):
    out = _run("info", cwd=tmp_path, HYPER_PARALLEL_PLATFORM="nope")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "backend           unavailable: HYPER_PARALLEL_PLATFORM='nope'" in out.stdout


def test_bad_subcommand_exits_nonzero_with_a_message(tmp_path):
    out = _run("bogus", cwd=tmp_path)
    assert out.returncode == 2
    assert "invalid choice: 'bogus'" in out.stderr
    assert "'info'" in out.stderr and "'demo'" in out.stderr and "'bench'" in out.stderr
    assert out.stdout == ""


def test_no_subcommand_exits_nonzero_with_usage(tmp_path):
    out = _run(cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: hyper-parallel")
    assert "the following arguments are required: command" in out.stderr


def test_unknown_option_of_info_is_an_error(tmp_path):
    out = _run("info", "--bogus", cwd=tmp_path)
    assert out.returncode == 2
    assert "unrecognized arguments: --bogus" in out.stderr


def test_log_level_reaches_every_rank_the_command_starts(tmp_path):
    out = _run("--log-level", "INFO", "demo", "--steps", "1", "--ep", "2", "--tp", "1", "--nproc", "2", "--out",
               str(tmp_path / "demo"), cwd=tmp_path, HYPER_PARALLEL_PLATFORM="torch")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for rank in (0, 1):
        # one prefix per line: the launcher's (the log does not repeat it)
        assert f"[rank {rank}] INFO hyper_parallel.platform: joined the world as rank {rank} of 2" in text, text
    assert "[rank 0] [rank 0]" not in text
    bad = _run("--log-level", "loud", "info", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'loud'" in bad.stderr, bad.stderr
