#!/usr/bin/env bash
# The packaging as a new user meets it: build the sdist and, from it, the wheel; install the wheel into a FRESH
# virtual environment with torch only; then, from a directory outside the source tree (so the checkout is not
# importable), run the INSTALLED `hyper-parallel --version`, `hyper-parallel info`, and the packaged MoE example on
# 2 processes through the installed launcher. Any failing step fails the script. Prints each step's wall time.
#
#   bash ci/wheel.sh               # builds with $VENV (default .venv; created with just the build tool if missing)
#   KEEP_WHEEL_DIR=1 bash ci/wheel.sh   # keep the scratch directory (wheel, fresh venv, logs) and print its path
#
# torch is installed first as exactly torch==2.13.0 (the CPU build on this machine's disk), then the wheel with its
# `[torch]` extra: the extra's range is then already met, so nothing pulls a multi-GB CUDA build. numpy is NOT
# installed by hand: the wheel's own dependencies must bring it. pip's cache (~/.cache/pip) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
TORCH_PIN=torch==2.13.0
BUILD_PIN=build==1.6.1
TIMEOUT_S=${WHEEL_STEP_TIMEOUT_S:-600}   # per step; the example's ranks have their own launcher --timeout

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/hyper_parallel_wheel.XXXXXX")
if [ -z "${KEEP_WHEEL_DIR:-}" ]; then
    trap 'rm -rf "$SCRATCH"' EXIT
fi
FRESH=$SCRATCH/venv
OUTSIDE=$SCRATCH/outside   # the working directory of every installed run: no hyper_parallel/ next to it
mkdir -p "$OUTSIDE"

total_start=$SECONDS
step_start=$SECONDS
step() {  # step "what": announce a step and start its clock; done_step prints its time
    echo "wheel: $1"
    step_start=$SECONDS
}
done_step() {
    echo "wheel:   ok ($((SECONDS - step_start)) s)"
}
fail() {
    echo "wheel: FAILED: $*" >&2
    exit 1
}
quiet() {  # quiet LOG CMD...: run with a timeout, output into LOG, shown only when the command fails
    local log=$SCRATCH/$1
    shift
    timeout "$TIMEOUT_S" "$@" >"$log" 2>&1 || { cat "$log" >&2; fail "$*"; }
}

# The version has one source, hyper_parallel/__init__.py; everything below must agree with it.
want_version=$(sed -n 's/^__version__ = "\([^"]*\)".*/\1/p' hyper_parallel/__init__.py)
[ -n "$want_version" ] || fail "no __version__ = \"...\" line in hyper_parallel/__init__.py"

step "build the sdist, then the wheel from the sdist ($BUILD_PIN, isolated build environments)"
quiet pip-build.log "$PY" -m pip install "$BUILD_PIN"
quiet build.log "$PY" -m build --outdir "$SCRATCH/dist" "$ROOT"
wheel=$(ls "$SCRATCH"/dist/hyper_parallel-*.whl)
case $(basename "$wheel") in
    "hyper_parallel-$want_version-"*) ;;
    *) fail "the wheel $(basename "$wheel") does not carry the version $want_version" ;;
esac
# What a user gets: the packages and the example, no tests.
"$PY" - "$wheel" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["hyper_parallel/__init__.py", "hyper_parallel/cli.py", "hyper_parallel/launch.py",
        "hyper_parallel/examples/moe_expert_parallel.py", "platform_adapters/torch.py",
        "platform_adapters/mindspore.py"]
missing = [n for n in need if n not in names]
stray = sorted(n for n in names if n.startswith("tests/"))
if missing or stray:
    sys.exit(f"missing from the wheel: {missing}; should not be in it: {stray}")
print(f"wheel:   {len(names)} files, {sys.argv[1].rsplit('/', 1)[-1]}")
EOF
done_step

# From here on, outside the source tree with nothing of the checkout on the path (`python -m pip` puts the working
# directory on sys.path, and ci/setup.sh exports PYTHONPATH: either would let pip see the checkout's editable
# install as "already satisfied" and skip the wheel): only the wheel can answer.
cd "$OUTSIDE"
unset PYTHONPATH HYPER_PARALLEL_PLATFORM

step "a fresh virtual environment: $TORCH_PIN, then the wheel with [torch]"
quiet venv.log "$PY" -m venv "$FRESH"
quiet pip-torch.log "$FRESH/bin/python" -m pip install "$TORCH_PIN"
quiet pip-wheel.log "$FRESH/bin/python" -m pip install "$wheel[torch]"
"$FRESH/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE "^(hyper-parallel|torch|numpy)==" \
    | sed 's/^/wheel:   installed /'
if "$FRESH/bin/python" -c "import mindspore" 2>/dev/null; then
    fail "mindspore is importable in the fresh environment: it must hold torch only"
fi
done_step

run_installed() {  # run_installed LOG CMD...: as quiet, then show the output
    quiet "$@"
    sed 's/^/wheel:   | /' "$SCRATCH/$1"
}

step "hyper-parallel --version"
run_installed version.log "$FRESH/bin/hyper-parallel" --version
got_version=$(cat "$SCRATCH/version.log")
[ "$got_version" = "$want_version" ] || fail "hyper-parallel --version printed '$got_version', want '$want_version'"
done_step

step "hyper-parallel info"
run_installed info.log "$FRESH/bin/hyper-parallel" info
grep -q "^backend           torch on cpu" "$SCRATCH/info.log" || fail "info does not resolve the torch backend"
grep -q "^hyper_parallel    $want_version .* from $FRESH/" "$SCRATCH/info.log" \
    || fail "info does not report version $want_version loaded from the fresh environment $FRESH"
done_step

step "the packaged MoE example on 2 processes through the installed launcher"
run_installed example.log "$FRESH/bin/python" -m hyper_parallel.launch --nproc 2 --timeout 300 \
    -m hyper_parallel.examples.moe_expert_parallel
ok=$(grep -c "output OK, gradient OK" "$SCRATCH/example.log" || true)
[ "$ok" = 2 ] || fail "the example reported 'output OK, gradient OK' on $ok of 2 ranks"
done_step

echo "wheel: OK: the wheel installs into a fresh torch-only environment and runs from outside the source tree" \
     "($((SECONDS - total_start)) s)"
if [ -n "${KEEP_WHEEL_DIR:-}" ]; then
    echo "wheel: kept $SCRATCH"
fi
