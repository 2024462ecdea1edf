#!/usr/bin/env bash
# Make .venv-infinity with infinity-emb, the rerank server that the remote-backend tests run and
# benchmarks/peers.py compares the proxy's engine with. Prints the server command's path.
#
# It lives apart from .venv: infinity-emb 0.0.78 pins sentence-transformers < 4 (so transformers 4.x)
# and numpy < 2, where the proxy runs transformers 5. It shares .venv's torch rather than installing a
# second one (torch with its CUDA libraries is about 6 GB; what infinity-emb adds is about 300 MB): a
# .pth file puts .venv's site-packages on its path *after* its own, so the packages infinity-emb pins
# to other versions come from .venv-infinity and torch (pinned to .venv's version, so pip finds it
# already satisfied) from .venv. Both sides therefore run the same kernels. It is rebuilt when .venv's
# torch changes, and `make clean` removes both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
INFINITY_VERSION=0.0.78
venv=.venv-infinity

if [[ ! -x .venv/bin/python ]]; then
  echo "scripts/infinity.sh: no .venv to share torch with; run 'make install' first" >&2
  exit 1
fi
torch_version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))')
shared=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pins=("infinity-emb[server,torch]==$INFINITY_VERSION" "torch==$torch_version")

# Whether $venv finished installing these pins against this .venv (read from its stamp and the
# packages' metadata, without importing torch: about a second).
holds_pins() {
  [[ -f $venv/.installed && -x $venv/bin/python && -x $venv/bin/infinity_emb ]] || return 1
  [[ "$(cat "$venv/.installed")" == "$(printf '%s\n' "${pins[@]}" "$shared")" ]] || return 1
  "$venv/bin/python" - "$INFINITY_VERSION" "$torch_version" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
infinity, torch = sys.argv[1], sys.argv[2]
sys.exit(0 if m.version("infinity-emb") == infinity and m.version("torch") == torch else 1)
EOF
}

if ! holds_pins; then
  echo "scripts/infinity.sh: installing ${pins[*]} into $venv, sharing torch with .venv (about 300 MB)" >&2
  rm -rf "$venv"  # a symlink into a cache or a folder of other versions, made by an older layout
  "$PYTHON" -m venv "$venv"
  own=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # Named to sort last among the .pth files: .venv's packages come after everything of its own.
  echo "$shared" >"$own/zz-rerank-proxy-shared-torch.pth"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet "${pins[@]}" >&2
  printf '%s\n' "${pins[@]}" "$shared" >"$venv/.installed"
fi
echo "$PWD/$venv/bin/infinity_emb"
