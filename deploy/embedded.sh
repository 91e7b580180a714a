#!/usr/bin/env bash
# Installs spine-triage into ./.venv and runs the node and a worker in embedded mode
# (SQLite, storage and a local broker under ./var/). Arguments go to `spine-triage up`,
# e.g. --demo to feed synthetic studies through the real path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/spine-triage up "$@"
