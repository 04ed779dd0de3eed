"""The examples run through the launcher on every backend and check their own results."""

import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.backends("torch", "mindspore")
@pytest.mark.parametrize("nproc", [2, 4])
def test_uneven_all_to_all_example(backend, nproc):
    env = {**os.environ, "HYPER_PARALLEL_PLATFORM": backend, "PYTHONPATH": REPO, "GLOG_v": "3",
           "GLOG_logtostderr": "0", "GLOG_log_dir": tempfile.mkdtemp()}
    out = subprocess.run([sys.executable, "-m", "hyper_parallel.launch", "--nproc", str(nproc), "--timeout", "240",
                          "examples/uneven_all_to_all.py"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if "values OK; gradient OK" in line]
    assert sorted(line.split("]")[0] for line in lines) == [f"[rank {r}" for r in range(nproc)], out.stdout
