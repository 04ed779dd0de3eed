# Shared setup of ci/test.sh and ci/demo.sh; source it from the repository root:
#
#   source ci/setup.sh     # sets ROOT, VENV (default $ROOT/.venv) and PY; creates and fills the venv
#
# It creates the virtual environment when missing and installs both frameworks, the package with its test tools
# and matplotlib (the demo's plot). pip leaves what is already installed alone, so a second run takes seconds.
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
# torch is pinned to the CPU build on this machine's disk: a bare `torch` would pull a multi-GB CUDA build.
"$PY" -m pip install -q torch==2.13.0 'numpy<2'
"$PY" -m pip install -q mindspore==2.10.0 'numpy<2'
"$PY" -m pip install -q -e ".[test]" matplotlib 'numpy<2'

# MindSpore logs: warnings and errors only, into a scratch directory (it must exist when logtostderr=0).
export GLOG_v=3 GLOG_logtostderr=0 GLOG_log_dir="$(mktemp -d)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
