#!/usr/bin/env bash
# Make the benchmark's virtualenvs: .venv (aqueue from this checkout + the peers) and .venv-arq.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-python3}"
"$python" -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
"$here/.venv/bin/pip" install -q -e "$repo[redis,amqp,uvloop]" -r "$here/requirements.txt"
"$python" -m venv "$here/.venv-arq"
"$here/.venv-arq/bin/pip" install -q --upgrade pip
"$here/.venv-arq/bin/pip" install -q -r "$here/requirements-arq.txt"
echo "Ready: python benchmarks/run.py --quick"
