"""The ``hyper-parallel`` command.

``hyper-parallel --version``: the package version (``hyper_parallel.__version__``, its single source).

``hyper-parallel info [--json]``: the resolved backend, installed framework versions, the device, which adapters can
be imported, and the launcher environment this process sees.

``hyper-parallel demo [options]``: train a small MoE on N local processes and check it against a single-process
run (see :mod:`hyper_parallel.demo`; ``hyper-parallel demo --help``).

``hyper-parallel bench [options]``: CPU benchmarks of the permutation and the EP dispatch + combine (see
:mod:`hyper_parallel.bench`; ``hyper-parallel bench --help``).

``demo`` and ``bench`` own their options: everything after the subcommand is handed to them, and their modules
(and frameworks) are imported only when they run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Sequence

from hyper_parallel import __version__, _select, log

WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MS_ROLE", _select.ENV_VAR)
_DISTRIBUTIONS = {"torch": "torch", "torch_npu": "torch-npu", "mindspore": "mindspore"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    """Everything ``hyper-parallel info`` reports, as a dict. Loads the resolved backend's framework."""
    info: dict = {
        "hyper_parallel": __version__,
        "hyper_parallel_path": os.path.dirname(os.path.abspath(_select.__file__)),
        "python": sys.version.split()[0],
        "frameworks": {name: _version(dist) for name, dist in _DISTRIBUTIONS.items()},
        "adapters_importable": _select.available_backends(),
        "world_env": {k: os.environ[k] for k in WORLD_VARS if k in os.environ},
    }
    try:
        name = _select.resolve_backend_name()
        platform = _select.load_platform_class(name)()
        info["backend"] = {"name": name, "device_type": platform.device_type,
                           "dist_backend": platform.dist_backend, "versions": platform.versions()}
    except (ValueError, ImportError) as e:
        info["backend"] = {"error": str(e)}
    return info


def _print_info(info: dict) -> None:
    backend = info["backend"]
    print(f"hyper_parallel    {info['hyper_parallel']} (python {info['python']}) from {info['hyper_parallel_path']}")
    if "error" in backend:
        print(f"backend           unavailable: {backend['error']}")
    else:
        print(f"backend           {backend['name']} on {backend['device_type']}, collectives via "
              f"{backend['dist_backend']}")
    for name, ok in info["adapters_importable"].items():
        version = info["frameworks"].get(name)
        print(f"adapter {name:<10}{'importable' if ok else 'not installed'}{f' ({version})' if version else ''}")
    env = info["world_env"]
    print("world env         " + (" ".join(f"{k}={v}" for k, v in env.items()) or "(none: single process)"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyper-parallel", description="Mixture-of-Experts parallelism toolkit")
    parser.add_argument("--version", action="version", version=__version__, help="print the version and exit")
    parser.add_argument("--log-level", type=str.lower, choices=log.LEVELS, default=None,
                        help=f"print the library's log at this level, on every rank this command starts (sets "
                             f"{log.ENV_VAR}; default: that variable, else silent)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the resolved backend, framework versions, device and world env")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    # add_help=False: `demo --help` reaches the subcommand's own parser with the rest of the arguments
    sub.add_parser("demo", add_help=False, help="train a small MoE on N local processes; check it against one "
                                                "process (hyper-parallel demo --help)")
    sub.add_parser("bench", add_help=False, help="CPU benchmarks: permutation, EP dispatch + combine, torch vs "
                                                 "MindSpore (hyper-parallel bench --help)")
    args, rest = parser.parse_known_args(argv)
    if args.log_level is not None:
        os.environ[log.ENV_VAR] = args.log_level  # the ranks a subcommand launches inherit it
        log.configure_logging(args.log_level)
    if args.command == "demo":
        from hyper_parallel.demo import main as demo_main

        return demo_main(rest)
    if args.command == "bench":
        from hyper_parallel.bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        data = collect_info()
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            _print_info(data)
        return 0 if "error" not in data["backend"] else 2
    return 2  # pragma: no cover - argparse rejects unknown commands
