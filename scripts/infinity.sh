#!/usr/bin/env bash
# Create .venv-infinity (once) with infinity-emb, the rerank server benchmarks/peers.py compares the
# proxy's engine with. It lives apart from .venv: infinity-emb 0.0.78 pins sentence-transformers < 4
# (so transformers 4.x) and numpy < 2, where the proxy runs transformers 5. torch is pinned to the
# version in .venv when there is one, so both sides run the same kernels (and pip's cache serves it).
# Prints the server command's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
venv=.venv-infinity
stamp=$venv/.installed
if [[ ! -f $stamp || scripts/infinity.sh -nt $stamp ]]; then
  [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
  torch_pin=()
  if [[ -x .venv/bin/python ]]; then
    version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
    [[ -n $version ]] && torch_pin=("torch==$version")
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet "infinity-emb[server,torch]==0.0.78" "${torch_pin[@]}" >&2
  touch "$stamp"
fi
echo "$PWD/$venv/bin/infinity_emb"
