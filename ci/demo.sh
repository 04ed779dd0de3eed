#!/usr/bin/env bash
# The demo on a fresh machine: creates the virtual environment like ci/test.sh (same $VENV, same installs, through
# ci/setup.sh), then trains the demo MoE on 4 local processes (torch, dp 2 x ExpertParallel 2) next to a
# single-process reference, prints the summary and writes demo_out/{demo.png,summary.json}. Exits nonzero when the
# loss curves differ by more than 1e-5. Its last line says how to enter the environment in a new shell
# (`source .venv/bin/activate`), which the README's next commands need.
#
#   bash ci/demo.sh                        # the default demo
#   bash ci/demo.sh --backend mindspore    # extra arguments go to `hyper-parallel demo`
#   VENV=/path bash ci/demo.sh             # reuse a virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
start=$SECONDS
status=0
"$VENV/bin/hyper-parallel" demo --out demo_out "$@" || status=$?
echo "demo finished in $((SECONDS - start)) s (setup included: ${SECONDS} s)"
print_activate_hint
exit $status
