"""Observability: the library logger (silent by default, per-rank lines), bytes per collective (in the conformance
suite), profiler ranges around dispatch / permute / experts / combine, and the MoE layer's routing statistics."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from hyper_parallel.log import configure_logging
from tests.cases import observability_cases as oc

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_logger():
    logger = logging.getLogger("hyper_parallel")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:], logger.level = handlers, level


def test_configure_logging_prefixes_the_rank_and_checks_the_level(restore_logger, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setenv("RANK", "3")
    configure_logging("info", stream=stream)
    logging.getLogger("hyper_parallel.some.module").info("hello %d", 7)
    logging.getLogger("hyper_parallel.some.module").debug("below the level")
    assert stream.getvalue() == "[rank 3] INFO hyper_parallel.some.module: hello 7\n"
    configure_logging("debug", stream=stream)  # reconfiguring replaces the handler: no duplicate lines
    logging.getLogger("hyper_parallel").debug("once")
    assert stream.getvalue().count("once") == 1
    with pytest.raises(ValueError, match=r"log level must be one of \['debug', 'info', .*got 'loud'"):
        configure_logging("loud")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "HYPER_PARALLEL_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, "PYTHONPATH": str(ROOT), **env})


def test_silent_by_default_and_switched_on_by_the_environment():
    code = "import logging, hyper_parallel; logging.getLogger('hyper_parallel.x').warning('visible?')"
    quiet = _python(code)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = _python(code, HYPER_PARALLEL_LOG_LEVEL="WARNING", RANK="1")
    assert loud.stderr == "[rank 1] WARNING hyper_parallel.x: visible?\n", loud.stderr
    bad = _python(code, HYPER_PARALLEL_LOG_LEVEL="chatty")
    assert bad.returncode == 0 and "log level must be one of" in bad.stderr and "visible?" not in bad.stderr


@pytest.mark.parametrize("nproc", [2, 4])
def test_every_rank_logs_its_world_and_its_dispatches(worlds, backend, nproc):
    for rank, text in enumerate(worlds.run(backend, nproc, oc.debug_log_of_a_step)):
        assert f"[rank {rank}] INFO hyper_parallel.expert_parallel.styles: ExpertParallel applied to GroupedExperts" \
            in text, text
        dispatches = [line for line in text.splitlines()
                      if line.startswith(f"[rank {rank}] DEBUG hyper_parallel.expert_parallel.dispatch: dispatch over "
                                         f"ranks {list(range(nproc))}: sending [")]
        assert len(dispatches) == 1, text


def test_the_launcher_passes_the_level_to_every_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYPER_PARALLEL_PLATFORM": "torch",
           "HYPER_PARALLEL_LOG_LEVEL": "info"}
    out = subprocess.run([sys.executable, "-m", "hyper_parallel.launch", "--nproc", "2", "--timeout", "120",
                          str(ROOT / "examples" / "uneven_all_to_all.py")], capture_output=True, text=True, env=env,
                         timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for rank in (0, 1):
        assert f"[rank {rank}] INFO hyper_parallel.platform: joined the world as rank {rank} of 2: torch on cpu" \
            in text, text


@pytest.mark.backends("torch")
def test_profiler_ranges_name_each_stage(worlds, backend):
    for names in worlds.run(backend, 2, oc.profiler_range_names):
        assert {"hyper_parallel.dispatch", "hyper_parallel.dispatch.wait", "hyper_parallel.permute",
                "hyper_parallel.moe.experts", "hyper_parallel.unpermute", "hyper_parallel.combine",
                "hyper_parallel.moe.router", "hyper_parallel.moe.reorder", "hyper_parallel.moe.shared_experts",
                "hyper_parallel.moe.combine_weighted"} <= set(names), names


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_routing_stats_after_each_step(worlds, backend, capacity_factor):
    worlds.run(backend, 2, oc.routing_stats_match_the_routing, capacity_factor)
