# Shared setup of ci/test.sh and ci/demo.sh; source it from the repository root:
#
#   source ci/setup.sh     # sets ROOT, VENV (default $ROOT/.venv) and PY; creates and fills the venv
#
# It creates the virtual environment when missing and installs both frameworks, the package (editable) with its
# `test` and `demo` extras (the test tools; matplotlib for the demo's plot). pip leaves what is already installed
# alone, so a second run takes seconds. `print_activate_hint` prints how to enter the environment in a new shell.
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
# torch is pinned to the CPU build on this machine's disk: a bare `torch` would pull a multi-GB CUDA build.
"$PY" -m pip install -q torch==2.13.0 'numpy<2'
"$PY" -m pip install -q mindspore==2.10.0 'numpy<2'
"$PY" -m pip install -q -e ".[test,demo]" 'numpy<2'
"$PY" -m pip install -q ruff==0.17.6   # the linter, pinned: a new release's new rules must not turn CI red
# The third-party MoE models of the integration tests (transformers, torchtitan), every version pinned in
# ci/third_party.txt (a constraints file, which says why torchtitan goes in alone with --no-deps). torchtitan last: pip
# then has no later install in this script to report its unneeded dependencies as missing.
"$PY" -m pip install -q -c "$ROOT/ci/third_party.txt" transformers spmd_types tyro 'numpy<2'
"$PY" -m pip install -q -c "$ROOT/ci/third_party.txt" --no-deps torchtitan
# A broken install fails here, by name, instead of the tests that need it skipping.
"$PY" -c "import transformers, torchtitan.models.common.moe" \
    || { echo "ci/setup.sh: transformers / torchtitan do not import: see ci/third_party.txt" >&2; false; }

# MindSpore logs: warnings and errors only, into a scratch directory (it must exist when logtostderr=0).
export GLOG_v=3 GLOG_logtostderr=0 GLOG_log_dir="$(mktemp -d)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The last line of ci/demo.sh and ci/test.sh: the README's commands need this environment in every new shell.
print_activate_hint() {
    local venv=$VENV
    case $venv in "$ROOT"/*) venv=${venv#"$ROOT"/} ;; esac  # relative to the repository root when inside it
    echo "To use this environment in a new shell (for hyper-parallel, python -m hyper_parallel.launch, ...):"
    echo "    source $venv/bin/activate"
}
