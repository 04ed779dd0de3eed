#!/usr/bin/env bash
# The project's test command. On a fresh machine it creates its own virtual environment, installs both frameworks
# and the test tools, runs the suite once per backend with coverage measured in every worker process, prints the
# per-backend pass counts, and fails under 90% line+branch coverage of hyper_parallel/ and platform_adapters/.
#
#   bash ci/test.sh            # everything
#   VENV=/path bash ci/test.sh # reuse a virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
FAIL_UNDER=${FAIL_UNDER:-90}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
# torch is pinned to the CPU build on this machine's disk: a bare `torch` would pull a multi-GB CUDA build.
"$PY" -m pip install -q torch==2.13.0 'numpy<2'
"$PY" -m pip install -q mindspore==2.10.0 'numpy<2'
"$PY" -m pip install -q -e ".[test]" 'numpy<2'

# MindSpore logs: warnings and errors only, into a scratch directory (it must exist when logtostderr=0).
export GLOG_v=3 GLOG_logtostderr=0 GLOG_log_dir="$(mktemp -d)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
REPORTS=$(mktemp -d)
rm -f .coverage .coverage.*

status=0
# Run 1: torch (+ the torch_npu adapter's logic on gloo) and every framework-neutral test.
HYPER_PARALLEL_TEST_BACKENDS=torch "$PY" -m coverage run -m pytest -q -p no:cacheprovider \
    --junitxml="$REPORTS/torch.xml" "$@" || status=1
# Run 2: every test parametrized by backend, on MindSpore.
HYPER_PARALLEL_TEST_BACKENDS=mindspore "$PY" -m coverage run -m pytest -q -p no:cacheprovider -k mindspore \
    --junitxml="$REPORTS/mindspore.xml" "$@" || status=1

"$PY" ci/summarize.py "$REPORTS"/*.xml || status=1
"$PY" -m coverage combine -q
"$PY" -m coverage report --fail-under="$FAIL_UNDER" || status=1
exit $status
