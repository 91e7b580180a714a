#!/usr/bin/env bash
# Installs spine-triage into a virtual environment (./.venv of the repository, or
# VENV) and runs the node and a worker in embedded mode: SQLite, storage and a
# local broker under ./var/ of the folder it is started from. Arguments go to
# `spine-triage up`, e.g. --demo to feed synthetic studies through the real path.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
venv="${VENV:-$PWD/.venv}"
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e .
cd "$here"
exec "$venv/bin/spine-triage" up "$@"
