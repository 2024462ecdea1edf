#!/usr/bin/env bash
# Create .venv (once) and install the package with its test tools. pip's cache (~/.cache/pip)
# serves repeat installs, torch's few GB included.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [[ ! -f $stamp || setup.cfg -nt $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
# The Elasticsearch 9 client for the test matrix's Elasticsearch 9 server, apart from .venv's 8.x
# client (a 9.x client sends compatible-with=9, which the default 8.x server refuses, and one
# environment holds one version). tests/server_clients.py runs it in a subprocess with this folder
# first on PYTHONPATH.
es9=.venv/es9-client
if [[ ! -f $es9/.installed || scripts/install.sh -nt $es9/.installed ]]; then
  rm -rf "$es9"
  .venv/bin/python -m pip install --quiet --target "$es9" "elasticsearch>=9,<10"
  touch "$es9/.installed"
fi
