#!/usr/bin/env bash
# Every shell command the README and the quickstart show must run as written in a fresh shell, after the set-up the
# README asks for (`bash ci/test.sh` or `bash ci/demo.sh`, then `source .venv/bin/activate`).
#
# Reads the ```bash blocks of README.md and docs/quickstart.md; joins `\`-continued lines and drops comment-only
# lines; skips the set-up commands themselves (`bash ci/test.sh`, `bash ci/demo.sh`: CI runs them already) and the
# `source .venv/bin/activate` line (every command gets it); runs each remaining command once (a command shown on both
# pages runs once), from the repository root, in `bash --noprofile --norc` with an empty environment (only HOME,
# PATH, LANG: nothing that ci/setup.sh exported, no PYTHONPATH), under a timeout. Fails when any command fails.
#
#   bash ci/doc_commands.sh                  # enters $VENV (default .venv) where the docs say .venv
#   DOC_COMMAND_TIMEOUT_S=600 bash ci/doc_commands.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
TIMEOUT_S=${DOC_COMMAND_TIMEOUT_S:-300}
DOCS=(README.md docs/quickstart.md)
SETUP_COMMANDS=("bash ci/test.sh" "bash ci/demo.sh" "source .venv/bin/activate")

if [ ! -f "$VENV/bin/activate" ]; then
    echo "doc commands: no virtual environment at $VENV: run bash ci/test.sh (or bash ci/demo.sh) first" >&2
    exit 2
fi
PY=$VENV/bin/python

# One command per line: "<file>:<line>\t<command>"; the set-up commands are left out, duplicates kept once.
commands=$("$PY" - "${DOCS[@]}" "${SETUP_COMMANDS[@]}" <<'EOF'
import re, sys

docs, setup = sys.argv[1:3], set(sys.argv[3:])
seen = set()
for doc in docs:
    lines = open(doc, encoding="utf-8").read().splitlines()
    in_block, in_bash, pending, start = False, False, "", 0
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```\s*(\w*)", line)
        if fence:  # opens a block (its language decides) or closes the open one
            in_block, in_bash = not in_block, not in_block and fence.group(1) in ("bash", "sh", "shell")
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        stripped = line.strip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command = (pending + stripped).strip()
        pending = ""
        command = re.sub(r"\s+#.*$", "", command).strip()  # a trailing comment; the commands hold no literal '#'
        if not command or command.startswith("#") or command in setup or command in seen:
            continue
        seen.add(command)
        print(f"{doc}:{start}\t{command}")
EOF
)
[ -n "$commands" ] || { echo "doc commands: found no command in ${DOCS[*]}" >&2; exit 1; }

FRESH_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin   # a login shell's PATH, nothing else
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
failed=0
count=0
total_start=$SECONDS
while IFS=$'\t' read -r where command; do
    count=$((count + 1))
    start=$SECONDS
    log=$LOGS/$count.log
    # A fresh shell: an empty environment but for HOME, a standard PATH and a locale; then what the docs say.
    if timeout -k 10 "$TIMEOUT_S" env -i HOME="$HOME" PATH="$FRESH_PATH" LANG=C.UTF-8 \
        bash --noprofile --norc -c "set -e; source \"\$1\"; $command" doc-command "$VENV/bin/activate" \
        </dev/null >"$log" 2>&1; then
        echo "doc commands: ok   $((SECONDS - start))s  $where  $command"
    else
        code=$?
        failed=$((failed + 1))
        why="exit $code"
        [ "$code" -ne 124 ] || why="timed out after ${TIMEOUT_S} s"
        echo "doc commands: FAIL $((SECONDS - start))s  $where  $command  ($why)" >&2
        tail -n 40 "$log" | sed 's/^/    | /' >&2
    fi
done <<<"$commands"

if [ "$failed" -ne 0 ]; then
    echo "doc commands: $failed of $count commands from ${DOCS[*]} failed ($((SECONDS - total_start)) s)" >&2
    exit 1
fi
echo "doc commands: all $count commands from ${DOCS[*]} ran in a fresh shell ($((SECONDS - total_start)) s)"
