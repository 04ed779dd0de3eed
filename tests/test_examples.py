"""The examples run through the launcher on every backend and check their own results."""

import os
import subprocess
import sys
import tempfile
import textwrap

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


# ---------------------------------------------------------------- the packaged example, through the launcher's -m
PACKAGED_EXAMPLE = "hyper_parallel.examples.moe_expert_parallel"


def _launch_module(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": REPO, "GLOG_v": "3", "GLOG_logtostderr": "0",
                "GLOG_log_dir": tempfile.mkdtemp(), **env}
    full_env.pop("HYPER_PARALLEL_PLATFORM", None)
    return subprocess.run([sys.executable, "-m", "hyper_parallel.launch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.backends("torch", "mindspore")
def test_packaged_moe_example_on_2_ranks(backend, tmp_path):
    """The quickstart's MoE under ExpertParallel, run as the docs say (-m, from any directory): every rank's output,
    input gradient and gathered expert gradients match the unsharded layer."""
    out = _launch_module(["--nproc", "2", "--backend", backend, "--timeout", "240", "-m", PACKAGED_EXAMPLE],
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = sorted(line for line in out.stdout.splitlines() if "output OK, gradient OK" in line)
    assert lines == [f"[rank {r}] rank {r}: 4 of 8 experts, 16 tokens: output OK, gradient OK" for r in range(2)], \
        out.stdout


@pytest.mark.backends("torch")
def test_packaged_moe_example_fails_on_a_mismatch(backend, tmp_path):
    """The example's check is real: the parallel layer fed other tokens than the reference makes every rank report
    what differs, and the launcher exits 1."""
    wrapper = tmp_path / "perturbed.py"
    wrapper.write_text(textwrap.dedent(f"""
        import {PACKAGED_EXAMPLE} as example

        original, calls = example.tokens, []

        def tokens(rank):  # the reference asks for every rank's tokens first; then the parallel layer's are shifted
            calls.append(rank)
            x, w = original(rank)
            return (x + 0.01, w) if len(calls) > example.get_platform().get_world_size() else (x, w)

        example.tokens = tokens
        raise SystemExit(example.main())
    """))
    out = _launch_module(["--nproc", "2", "--backend", backend, "--timeout", "240", str(wrapper)], cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "MISMATCH: output differs" in out.stdout and "input gradient differs" in out.stdout, out.stdout
    assert "gradient of experts.w1 differs" in out.stdout, out.stdout
    assert "output OK" not in out.stdout


def test_launcher_module_flag_needs_a_module_name(capsys):
    from hyper_parallel import launch

    assert launch.main(["--nproc", "2", "-m", "examples/uneven_all_to_all.py"]) == 2
    err = capsys.readouterr().err
    assert "-m needs a dotted module name" in err and "'examples/uneven_all_to_all.py'" in err
    with pytest.raises(ValueError, match="dotted module name"):
        launch.launch(["not a module"], 1, module=True)


def test_launcher_runs_a_module_with_its_arguments(tmp_path):
    """-m runs `python -m module args...` on every rank, with the launcher's environment."""
    (tmp_path / "echo_rank.py").write_text("import os, sys\nprint('module', os.environ['RANK'], sys.argv[1:])\n")
    out = _launch_module(["--nproc", "2", "-m", "echo_rank", "--flag", "x"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(line for line in out.stdout.splitlines() if "module" in line) == [
        "[rank 0] module 0 ['--flag', 'x']", "[rank 1] module 1 ['--flag', 'x']"]


@pytest.mark.backends("torch")
@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("example,done", [
    ("examples/transformers_moe.py", "the expert-parallel Qwen3-MoE trained as on one process"),
    ("examples/torchtitan_moe.py", "torchtitan MoE expert-parallel matches one process"),
])
def test_third_party_model_examples(backend, nproc, example, done):
    """The recipes of docs/your_model.md (included there from these files) check themselves on every rank."""
    env = {**os.environ, "HYPER_PARALLEL_PLATFORM": backend, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "hyper_parallel.launch", "--nproc", str(nproc), "--timeout", "240",
                          example], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(line.split("]")[0] for line in out.stdout.splitlines() if done in line) == \
        [f"[rank {r}" for r in range(nproc)], out.stdout


@pytest.mark.backends("torch", "mindspore")
def test_data_parallel_training_example(backend):
    """The training recipe of docs/training.md checks itself against one process on every rank."""
    env = {**os.environ, "HYPER_PARALLEL_PLATFORM": backend, "PYTHONPATH": REPO, "GLOG_v": "3",
           "GLOG_logtostderr": "0", "GLOG_log_dir": tempfile.mkdtemp()}
    out = subprocess.run([sys.executable, "-m", "hyper_parallel.launch", "--nproc", "4", "--timeout", "240",
                          "examples/train_moe_data_parallel.py"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    done = [line for line in out.stdout.splitlines() if "training with" in line and "matches one process" in line]
    assert sorted(line.split("]")[0] for line in done) == [f"[rank {r}" for r in range(4)], out.stdout
