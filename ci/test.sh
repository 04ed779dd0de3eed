#!/usr/bin/env bash
# The project's test command. On a fresh machine it creates its own virtual environment, installs both frameworks
# and the test tools, runs the suite once per backend with coverage measured in every worker process, prints the
# per-backend pass counts, builds the docs site (warnings are errors), and fails under 90% line+branch coverage of
# hyper_parallel/ and platform_adapters/.
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
# Run 1: torch (+ the torch_npu adapter's logic on gloo) and every framework-neutral test.
HYPER_PARALLEL_TEST_BACKENDS=torch "$PY" -m coverage run -m pytest -q -p no:cacheprovider \
    --junitxml="$REPORTS/torch.xml" "$@" || status=1
# Run 2: every test parametrized by backend, on MindSpore.
HYPER_PARALLEL_TEST_BACKENDS=mindspore "$PY" -m coverage run -m pytest -q -p no:cacheprovider -k mindspore \
    --junitxml="$REPORTS/mindspore.xml" "$@" || status=1

"$PY" ci/summarize.py "$REPORTS"/*.xml || status=1
# The documentation site, built offline with warnings as errors.
bash ci/docs.sh "$VENV" || status=1
"$PY" -m coverage combine -q
"$PY" -m coverage report --fail-under="$FAIL_UNDER" || status=1
exit $status
