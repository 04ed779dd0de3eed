#!/usr/bin/env bash
# Build the documentation site offline with warnings as errors (mkdocs --strict), into a temporary directory.
# Installs the pinned docs tools into the virtual environment first.
#
#   bash ci/docs.sh                 # uses $VENV, default .venv (created if missing)
#   VENV=/path bash ci/docs.sh      # reuse a virtual environment
#   bash ci/docs.sh /path/to/venv   # the same, as an argument
#   SITE_DIR=site bash ci/docs.sh   # keep the built site there instead of a temporary directory
#
# The API reference is read from the source statically (griffe): building it imports no framework, so the docs
# tools are all this needs on top of Python.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${1:-${VENV:-$ROOT/.venv}}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
"$PY" -m pip install -q mkdocs==1.6.1 mkdocs-material==9.8.1 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11 \
    griffelib==2.4.1 mkdocs-autorefs==1.4.5 pymdown-extensions==13.1

OUT=${SITE_DIR:-$(mktemp -d)}
export NO_MKDOCS_2_WARNING=1   # the theme's end-of-life banner is not a build problem
"$PY" -m mkdocs build --strict --clean -f mkdocs.yml -d "$OUT"
echo "docs: built without warnings into $OUT"
