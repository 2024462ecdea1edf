#!/usr/bin/env bash
# Make .venv-infinity (once per machine) with infinity-emb, the rerank server that the remote-backend
# tests run and benchmarks/peers.py compares the proxy's engine with. Prints the server command's path.
#
# It lives apart from .venv: infinity-emb 0.0.78 pins sentence-transformers < 4 (so transformers 4.x)
# and numpy < 2, where the proxy runs transformers 5. torch is pinned to the version in .venv when there
# is one, so both sides run the same kernels. The install is about 6 GB, so the environment is kept in
# the user's cache, keyed on what is installed in it:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-proxy/venv-infinity-<hash of the pins, python and machine>
# and .venv-infinity is a symlink to it: a fresh clone of the project reuses it, and a change of pins
# makes a new one beside it. A .venv-infinity that is a real folder holding the pinned versions (made
# before the cache existed) is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
INFINITY_VERSION=0.0.78
pins=("infinity-emb[server,torch]==$INFINITY_VERSION")
torch_version=
if [[ -x .venv/bin/python ]]; then
  torch_version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' 2>/dev/null || true)
  [[ -n $torch_version ]] && pins+=("torch==$torch_version")
fi
link=.venv-infinity

# Whether the venv in $1 finished installing and holds the pinned versions (read from its metadata,
# without importing torch: about a second).
holds_pins() {
  [[ -f $1/.installed && -x $1/bin/python && -x $1/bin/infinity_emb ]] || return 1
  "$1/bin/python" - "$INFINITY_VERSION" "$torch_version" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
infinity, torch = sys.argv[1], sys.argv[2]
ok = m.version("infinity-emb") == infinity and (not torch or m.version("torch").split("+")[0] == torch)
sys.exit(0 if ok else 1)
EOF
}

if [[ -d $link && ! -L $link ]] && holds_pins "$link"; then
  echo "$PWD/$link/bin/infinity_emb"
  exit 0
fi

key=$(printf '%s\n' "${pins[@]}" "$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')" "$(uname -sm)" \
  | sha256sum | cut -c1-12)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/rerank-proxy
venv=$cache/venv-infinity-$key
mkdir -p "$cache"
(
  flock 9  # two clones installing at once would write into one folder
  if ! holds_pins "$venv"; then
    echo "scripts/infinity.sh: installing ${pins[*]} into $venv (about 6 GB, once per machine)" >&2
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet "${pins[@]}" >&2
    printf '%s\n' "${pins[@]}" >"$venv/.installed"
  fi
) 9>"$cache/venv-infinity.lock"

if [[ -e $link && ! -L $link ]]; then
  rm -rf "$link"  # a folder of other versions, made before the cache existed
fi
ln -sfn "$venv" "$link"
echo "$PWD/$link/bin/infinity_emb"
