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


def _free_port() -> int:
    from hyper_parallel.launch import free_port

    return free_port()


@pytest.mark.backends("torch")
def test_under_torchrun(backend, tmp_path):
    """init_process_group() with no arguments joins a world started by torchrun."""
    env = {**os.environ, "HYPER_PARALLEL_PLATFORM": "torch", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "examples/uneven_all_to_all.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("values OK; gradient OK") == 2, out.stdout


@pytest.mark.backends("mindspore")
def test_under_msrun(backend, tmp_path):
    """init_process_group() with no arguments joins a world started by MindSpore's msrun (scheduler process, no
    RANK / WORLD_SIZE in the environment)."""
    bin_dir = os.path.dirname(sys.executable)  # msrun starts `python` from PATH
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HYPER_PARALLEL_PLATFORM="mindspore", PYTHONPATH=REPO, PATH=bin_dir + os.pathsep + env["PATH"],
               GLOG_v="3", GLOG_logtostderr="0", GLOG_log_dir=str(tmp_path))
    logs = tmp_path / "msrun_logs"
    out = subprocess.run([os.path.join(bin_dir, "msrun"), "--worker_num=2", "--local_worker_num=2",
                          f"--master_port={_free_port()}", "--join=True", "--cluster_time_out=60",
                          f"--log_dir={logs}", "examples/uneven_all_to_all.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    worker_logs = "".join((logs / f"worker_{r}.log").read_text() for r in range(2))
    assert worker_logs.count("values OK; gradient OK") == 2, worker_logs[-3000:]
