#!/usr/bin/env bash
# Print the path of a helm binary of the pinned version, building it once per machine.
#
#   bash scripts/helm.sh            # -> /home/me/.cache/rerank-proxy/bin/helm-v3.22.0/helm
#
# helm is built from source with `go install` (Go from PATH or /usr/local/go/bin; modules from the Go
# module proxy). The binary lives under ${XDG_CACHE_HOME:-~/.cache}/rerank-proxy/bin/helm-<version>,
# so a later run, or another checkout on the same machine, reuses it; Go's own module and build
# caches (go env GOMODCACHE, GOCACHE) keep a rebuild cheap. HELM_VERSION picks another version.
# Progress goes to stderr; stdout is the path alone. Exit status 1, with the reason, when no helm
# can be had.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/rerank-proxy/bin"
BIN_DIR="$CACHE_BIN/helm-${HELM_VERSION}"
HELM="$BIN_DIR/helm"

if [[ -x "$HELM" ]] && [[ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]; then
    echo "$HELM"
    exit 0
fi

GO="$(command -v go || true)"
if [[ -z "$GO" && -x /usr/local/go/bin/go ]]; then
    GO=/usr/local/go/bin/go
fi
if [[ -z "$GO" ]]; then
    echo "scripts/helm.sh: no helm ${HELM_VERSION} at $HELM and no Go toolchain to build it (go on PATH or /usr/local/go/bin/go)" >&2
    exit 1
fi

mkdir -p "$CACHE_BIN"
# Build into a temporary folder and move the binary into place, so an interrupted build never
# leaves a half-written helm where the next run would take it.
tmp="$(mktemp -d "$CACHE_BIN/.helm-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "scripts/helm.sh: building helm ${HELM_VERSION} with $("$GO" version) (once per machine)..." >&2
start=$SECONDS
# The link flags helm's own Makefile sets: its version, and the Kubernetes version that
# `helm template` and `helm lint` assume (one above client-go's v0 major: client-go v0.37 -> 1.37),
# without which a chart's kubeVersion is checked against 1.20.
if ! module_dir="$("$GO" mod download -json "helm.sh/helm/v3@${HELM_VERSION}" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')" \
        || [[ -z "$module_dir" ]]; then
    echo "scripts/helm.sh: cannot download helm.sh/helm/v3@${HELM_VERSION} (Go module proxy: $("$GO" env GOPROXY))" >&2
    exit 1
fi
client_go="$(sed -n 's/^\tk8s\.io\/client-go v\([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p' "$module_dir/go.mod")"
read -r k8s_major k8s_minor <<<"$client_go" || true
if [[ -z "${k8s_minor:-}" ]]; then
    echo "scripts/helm.sh: no k8s.io/client-go version in $module_dir/go.mod" >&2
    exit 1
fi
ldflags="-w -s -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
for pkg in pkg/lint/rules pkg/chartutil; do
    ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=$((k8s_major + 1))"
    ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${k8s_minor}"
done
if ! GOBIN="$tmp" CGO_ENABLED=0 "$GO" install -trimpath -ldflags "$ldflags" \
        "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" >&2; then
    echo "scripts/helm.sh: go install helm.sh/helm/v3/cmd/helm@${HELM_VERSION} failed" >&2
    exit 1
fi
mkdir -p "$BIN_DIR"
mv -f "$tmp/helm" "$HELM"
echo "scripts/helm.sh: built $HELM in $((SECONDS - start))s" >&2
echo "$HELM"
