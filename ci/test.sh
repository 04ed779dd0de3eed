#!/usr/bin/env bash
# The project's test command. On a fresh machine it creates its own virtual environment, installs both frameworks
# and the test tools, lints (ruff), runs the suite once per backend with coverage measured in every worker process,
# prints the per-backend pass counts, builds the docs site (warnings are errors), checks the packaging (ci/wheel.sh:
# the built wheel in a fresh torch-only environment) and the documented commands (ci/doc_commands.sh: every command of the
# README and the quickstart, in a fresh shell), and fails under 90% line+branch coverage of hyper_parallel/ and
# platform_adapters/. Its last line says how to enter the environment in a new shell.
#
#   bash ci/test.sh            # everything
#   VENV=/path bash ci/test.sh # reuse a virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
FAIL_UNDER=${FAIL_UNDER:-90}
# the virtual environment ($VENV, default .venv), both frameworks, the test tools; sets ROOT, VENV, PY
source ci/setup.sh
REPORTS=$(mktemp -d)
rm -f .coverage .coverage.*

status=0
# The linter (config in ruff.toml): the package, the adapters, the tests, the examples, ci/.
"$PY" -m ruff check . || status=1
# Run 1: torch (+ the torch_npu adapter's logic on gloo) and every framework-neutral test.
HYPER_PARALLEL_TEST_BACKENDS=torch "$PY" -m coverage run -m pytest -q -p no:cacheprovider \
    --junitxml="$REPORTS/torch.xml" "$@" || status=1
# Run 2: every test parametrized by backend, on MindSpore.
HYPER_PARALLEL_TEST_BACKENDS=mindspore "$PY" -m coverage run -m pytest -q -p no:cacheprovider -k mindspore \
    --junitxml="$REPORTS/mindspore.xml" "$@" || status=1

"$PY" ci/summarize.py "$REPORTS"/*.xml || status=1
# The documentation site, built offline with warnings as errors.
bash ci/docs.sh "$VENV" || status=1
# The packaging: the wheel, installed into a fresh torch-only environment, run from outside the source tree.
VENV=$VENV bash ci/wheel.sh || status=1
# Every command the README and the quickstart show, in a fresh shell that entered $VENV as they say.
VENV=$VENV bash ci/doc_commands.sh || status=1
"$PY" -m coverage combine -q
"$PY" -m coverage report --fail-under="$FAIL_UNDER" || status=1
print_activate_hint
exit $status
