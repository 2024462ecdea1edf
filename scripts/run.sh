#!/usr/bin/env bash
# Install the proxy into .venv and run it. With no Elasticsearch configured (neither
# RERANK_PROXY_UPSTREAM_URL nor --upstream/--upstream-url/--config given), a local one is started
# first with scripts/elasticsearch.sh on 127.0.0.1:9200. Extra arguments go to rerank-proxy.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh

configured=${RERANK_PROXY_UPSTREAM_URL:-}
for arg in "$@"; do
  case "$arg" in --upstream|--upstream=*|--upstream-url|--upstream-url=*|--config|--config=*) configured=yes ;; esac
done
if [[ -z "$configured" ]]; then
  url=$(ES_PORT="${ES_PORT:-9200}" bash scripts/elasticsearch.sh start)
  echo "run.sh: no Elasticsearch configured; started one at $url (stop it: scripts/elasticsearch.sh stop)" >&2
  set -- --upstream "$url" "$@"
fi
exec .venv/bin/rerank-proxy "$@"
