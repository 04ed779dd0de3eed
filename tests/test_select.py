"""Backend selection, the framework-free import, and errors raised before any world exists."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys

import pytest

import hyper_parallel
from hyper_parallel import _select, cli, functional
from hyper_parallel.kernels import Kernels
from hyper_parallel.platform import Platform, WorldEnv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_import_loads_no_framework_in_a_fresh_interpreter():
    code = ("import sys, hyper_parallel, hyper_parallel.launch, hyper_parallel.testing, hyper_parallel.cli, "
            "hyper_parallel.moe, hyper_parallel.functional, hyper_parallel.kernels, hyper_parallel.log; "
            "print([m for m in ('torch', 'mindspore', 'torch_npu', 'numpy') if m in sys.modules])")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("value,expected", [("torch", "torch"), ("TORCH", "torch"), (" MindSpore ", "mindspore"),
                                            ("torch_npu", "torch_npu")])
def test_env_var_is_case_insensitive(value, expected):
    assert _select.resolve_backend_name(value) == expected


def test_unknown_backend_names_value_and_valid_options():
    with pytest.raises(ValueError, match=r"HYPER_PARALLEL_PLATFORM='jax' is not a known backend; valid values: "
                                         r"\['mindspore', 'torch', 'torch_npu'\]"):
        _select.resolve_backend_name("jax")


def test_auto_detect_order(monkeypatch):
    monkeypatch.delenv(_select.ENV_VAR, raising=False)
    installed = {"torch"}
    monkeypatch.setattr(_select.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert _select.resolve_backend_name() == "torch"
    installed.add("torch_npu")
    assert _select.resolve_backend_name() == "torch_npu"
    installed.clear()
    installed.add("mindspore")
    assert _select.resolve_backend_name() == "mindspore"
    installed.clear()
    with pytest.raises(ValueError, match=r"unset and no supported framework is installed.*pip install"):
        _select.resolve_backend_name()


def test_missing_framework_says_what_to_install():
    # torch_npu is not installed on this host: selecting it must say how to fix that.
    with pytest.raises(ImportError, match=r"needs the 'torch_npu' package.*fix: pip install 'torch>=2.4' torch-npu"):
        _select.load_platform_class("torch_npu")
    out = _python("import hyper_parallel; hyper_parallel.get_platform()", HYPER_PARALLEL_PLATFORM="torch_npu")
    assert out.returncode != 0 and "pip install" in out.stderr and "torch-npu" in out.stderr


def test_torch_npu_adapter_without_torch_npu_explains_the_fix():
    from platform_adapters.torch_npu import TorchNpuPlatform

    with pytest.raises(ImportError, match=r"could not import torch_npu .*pip install torch-npu"):
        TorchNpuPlatform()


class _ToyPlatform:
    """Stands in for a third-party adapter's class (only its identity matters here)."""


def test_third_party_adapter_through_entry_point(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="Toy", value=f"{__name__}:_ToyPlatform", group=_select.ENTRY_POINT_GROUP)
    monkeypatch.setattr(_select.importlib.metadata, "entry_points", lambda group: [ep])
    assert _select.resolve_backend_name("toy") == "toy"
    assert _select.load_platform_class("toy") is _ToyPlatform
    assert _select.available_backends()["toy"] is True


@pytest.mark.backends("torch", "mindspore")
def test_get_platform_caches_and_reports_name(backend):
    code = ("import hyper_parallel as hp; p = hp.get_platform(); assert p is hp.get_platform(); "
            "assert isinstance(p, hp.Platform); print(p.name, p.device_type)")
    out = _python(code, HYPER_PARALLEL_PLATFORM=backend.upper(), GLOG_v="3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == backend


@pytest.mark.backends("torch", "mindspore")
def test_collective_before_init_process_group(backend):
    code = ("import hyper_parallel as hp\np = hp.get_platform()\nassert not p.is_initialized()\n"
            "for call in (lambda: p.all_reduce(p.zeros((1,))), p.get_rank, p.barrier, lambda: p.new_group([0])):\n"
            "    try:\n        call()\n    except RuntimeError as e:\n        print(e)\n"
            "    else:\n        raise SystemExit('no error')\n")
    out = _python(code, HYPER_PARALLEL_PLATFORM=backend, GLOG_v="3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all("before init_process_group()" in line for line in lines), lines


def test_world_env_parsing():
    env = WorldEnv.from_environ({"RANK": "1", "WORLD_SIZE": "4", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (1, 4, 1, "127.0.0.1")
    with pytest.raises(ValueError, match=r"missing \['RANK', 'MASTER_PORT'\]"):
        WorldEnv.from_environ({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        WorldEnv.from_environ({"RANK": "a", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match=r"0 <= RANK < WORLD_SIZE, got RANK=2, WORLD_SIZE=2"):
        WorldEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_platform_is_abstract_and_the_contract_comes_in_three_groups():
    with pytest.raises(TypeError, match="abstract"):
        Platform()
    # 1. what an adapter MUST provide: kept small (it was 48 members with kernels and autograd collectives mixed in)
    public = {n for n in dir(Platform) if not n.startswith("_")}
    assert 30 <= len(public) <= 46, sorted(public)
    assert not {n for n in public if "differentiable" in n or n in ("grouped_mm", "permute_slots", "zeros_connected")}
    # 2. what it MAY replace: the kernels, each with a neutral reference
    assert sorted(n for n in dir(Kernels) if not n.startswith("_")) == [
        "combine_pairs", "convert", "expert_counts", "gate_up", "gather_pairs", "grouped_mm", "host_index_build",
        "matmul", "permute_rows", "permute_slots", "stable_order", "swiglu", "take_rows", "use_fused_permute"]
    # 3. what is written once on top: plain functions
    assert all(callable(getattr(functional, n)) for n in functional.__all__)
    assert "all_to_all_single_autograd" in functional.__all__


def test_split_sizes_are_keyword_only():
    params = inspect.signature(Platform.all_to_all_single).parameters
    assert [n for n, v in params.items() if v.kind is v.POSITIONAL_OR_KEYWORD] == ["self", "x"]
    params = inspect.signature(functional.all_to_all_single_autograd).parameters
    assert [n for n, v in params.items() if v.kind is v.POSITIONAL_OR_KEYWORD] == ["x"]


def test_info_command(capsys, monkeypatch):
    monkeypatch.setenv(_select.ENV_VAR, "torch")
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backend           torch on cpu, collectives via gloo" in text
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"]["name"] == "torch" and data["adapters_importable"]["torch"] is True
    monkeypatch.setenv(_select.ENV_VAR, "nope")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["info"]) == 2
    text = capsys.readouterr().out
    assert "unavailable: HYPER_PARALLEL_PLATFORM='nope'" in text and "RANK=0" in text


def test_console_entry_points_run():
    out = subprocess.run([sys.executable, "-m", "hyper_parallel", "info"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO, "HYPER_PARALLEL_PLATFORM": "torch"}, timeout=120)
    assert out.returncode == 0 and "backend           torch" in out.stdout, out.stderr


def test_package_exports():
    assert set(hyper_parallel.__all__) >= {"get_platform", "Platform", "Group"}
