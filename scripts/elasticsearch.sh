#!/usr/bin/env bash
# Start/stop a throw-away local Elasticsearch or OpenSearch (no Docker needed)
# for tests, CI and local development. Listens on 127.0.0.1 only.
#
#   scripts/elasticsearch.sh start|stop|status|url
#
# Knobs (env):
#   ES_DISTRIBUTION  elasticsearch (default) or opensearch
#   ES_VERSION   8.19.21 for elasticsearch, 3.8.0 for opensearch; any version
#                whose integ-test zip is on Maven Central
#                (org.elasticsearch.distribution.integ-test-zip:elasticsearch,
#                org.opensearch.distribution.integ-test-zip:opensearch)
#   ES_PORT (9200)  ES_HEAP (512m)  ES_JAVA_OPTS (extra JVM flags, both engines)
#   ES_HOME_DIR  where the distribution is unpacked; run-time state (data, logs,
#                config, pid) lives in $ES_HOME_DIR/run-$ES_PORT, so several
#                ports can run side by side.
#                Default: ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-proxy/$ES_DISTRIBUTION-$ES_VERSION,
#                or /var/cache/rerank-proxy/$ES_DISTRIBUTION-$ES_VERSION as root
#                (root's home is usually 0700, so the unprivileged server user
#                could not read it).
#   ES_JAVA_HOME JDK to run with. Default: the oldest JDK on the machine that the
#                server needs (Elasticsearch 8: 17, 9: 21; OpenSearch 2: 11,
#                3: 21), looked for under /usr/lib/jvm, $JAVA_HOME and `java`
#                on PATH; so Elasticsearch 8 and OpenSearch 2 get a JDK 17 and
#                Elasticsearch 9 and OpenSearch 3 a JDK 21+ (Temurin 25 here).
#   ES_USER      account the server runs as when invoked as root (rerankes).
#
# Examples: ES_PORT=9251 ES_VERSION=9.5.4 scripts/elasticsearch.sh start
#           ES_PORT=9252 ES_DISTRIBUTION=opensearch ES_VERSION=3.8.0 scripts/elasticsearch.sh start
set -euo pipefail

ES_DISTRIBUTION="${ES_DISTRIBUTION:-elasticsearch}"
case "$ES_DISTRIBUTION" in
  elasticsearch)
    ES_VERSION="${ES_VERSION:-8.19.21}"
    PRODUCT=Elasticsearch
    MAVEN_GROUP=org.elasticsearch.distribution.integ-test-zip
    ENV_PREFIX=ES # ES_JAVA_HOME, ES_PATH_CONF, ES_TMPDIR, ES_JAVA_OPTS
    ;;
  opensearch)
    ES_VERSION="${ES_VERSION:-3.8.0}"
    PRODUCT=OpenSearch
    MAVEN_GROUP=org.opensearch.distribution.integ-test-zip
    ENV_PREFIX=OPENSEARCH # OPENSEARCH_JAVA_HOME, OPENSEARCH_PATH_CONF, ...
    ;;
  *)
    echo "elasticsearch.sh: ES_DISTRIBUTION must be elasticsearch or opensearch, not '$ES_DISTRIBUTION'" >&2
    exit 2
    ;;
esac
ES_PORT="${ES_PORT:-9200}"
ES_HEAP="${ES_HEAP:-512m}"
ES_USER="${ES_USER:-rerankes}"
ES_START_TIMEOUT="${ES_START_TIMEOUT:-120}"
if [[ -z "${ES_HOME_DIR:-}" ]]; then
  if [[ $EUID -eq 0 ]]; then
    ES_HOME_DIR="/var/cache/rerank-proxy/$ES_DISTRIBUTION-$ES_VERSION"
  else
    ES_HOME_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/rerank-proxy/$ES_DISTRIBUTION-$ES_VERSION"
  fi
fi
MAJOR="${ES_VERSION%%.*}"

URL="http://127.0.0.1:$ES_PORT"
DIST="$ES_HOME_DIR/$ES_DISTRIBUTION-$ES_VERSION" # unpacked zip, shared by all ports
RUN="$ES_HOME_DIR/run-$ES_PORT"                  # per-port state
PIDFILE="$RUN/$ES_DISTRIBUTION.pid"
LOGFILE="$RUN/logs/rerank-proxy-test.log" # named after cluster.name
# Transport port must not clash between instances; only used internally.
TRANSPORT_PORT=$((ES_PORT + 100))

log() { echo "elasticsearch.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# True when the server on the port is this script's product and version.
# Elasticsearch: not `GET /` (the integ-test zip lacks the rest-root module, so
# / is a 405); its product header is required so another HTTP server on the
# port doesn't count. OpenSearch sends no product header, but its `GET /` (in
# the integ-test zip too) names the distribution.
is_up() {
  local out
  case "$ES_DISTRIBUTION" in
    elasticsearch)
      out="$(curl -fsS -D - --max-time 10 "$URL/_nodes/_local?filter_path=nodes.*.version" 2>/dev/null)" || return 1
      grep -qi '^x-elastic-product: *elasticsearch' <<<"$out" || return 1
      grep -q "\"version\":\"$ES_VERSION\"" <<<"$out"
      ;;
    opensearch)
      out="$(curl -fsS --max-time 10 "$URL/" 2>/dev/null)" || return 1
      grep -Eq '"distribution" *: *"opensearch"' <<<"$out" || return 1
      grep -Eq "\"number\" *: *\"$ES_VERSION\"" <<<"$out"
      ;;
  esac
}

# PID from our pidfile if that process is still alive and really is our server
# (guards against a stale pidfile whose PID got reused).
running_pid() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid="$(tr -dc '0-9' <"$PIDFILE")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "org\.$ES_DISTRIBUTION" || return 1
  echo "$pid"
}

# The feature version of the JDK at $1 (17, 21, 25...), from its release file.
java_major() {
  local v
  v="$(sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$1/release" 2>/dev/null)"
  [[ -n "$v" ]] && echo "$v"
}

find_java_home() {
  if [[ -n "${ES_JAVA_HOME:-}" ]]; then echo "$ES_JAVA_HOME"; return; fi
  local need=17 d best="" best_major=999 major
  case "$ES_DISTRIBUTION:$MAJOR" in
    elasticsearch:[0-8]) need=17 ;;
    elasticsearch:*) need=21 ;;
    opensearch:[0-2]) need=11 ;;
    opensearch:*) need=21 ;;
  esac
  # The oldest JDK that is new enough: the combination each release was
  # built and tested with, rather than whatever is newest.
  local -a candidates=(/usr/lib/jvm/*)
  [[ -n "${JAVA_HOME:-}" ]] && candidates+=("$JAVA_HOME")
  d="$(command -v java 2>/dev/null)" && d="$(readlink -f "$d")" && candidates+=("${d%/bin/java}")
  for d in "${candidates[@]}"; do
    [[ -x "$d/bin/java" ]] || continue
    major="$(java_major "$d")" || continue
    if ((major >= need && major < best_major)); then
      best="$d" best_major=$major
    fi
  done
  [[ -n "$best" ]] || die "no JDK $need+ found for $PRODUCT $ES_VERSION: install one or set ES_JAVA_HOME"
  echo "$best"
}

# Download (via Maven, which caches in ~/.m2) and unpack once.
ensure_dist() {
  [[ -x "$DIST/bin/$ES_DISTRIBUTION" ]] && return 0
  local dl="$ES_HOME_DIR/download" zip tmp artifact
  artifact="$MAVEN_GROUP:$ES_DISTRIBUTION:$ES_VERSION:zip"
  zip="$dl/$ES_DISTRIBUTION-$ES_VERSION.zip"
  mkdir -p "$dl"
  if [[ ! -s "$zip" ]]; then
    command -v mvn >/dev/null || die "mvn not found (needed to fetch $PRODUCT $ES_VERSION)"
    log "fetching $artifact via Maven"
    # stdout -> stderr: `start` prints only the URL on stdout.
    mvn -B -q dependency:copy -Dartifact="$artifact" -DoutputDirectory="$dl" >&2
  fi
  # Unpack beside the target and rename, so an interrupted unzip never
  # leaves a half tree that looks complete.
  tmp="$(mktemp -d "$ES_HOME_DIR/.unpack.XXXXXX")"
  log "unpacking $zip"
  if command -v unzip >/dev/null; then
    unzip -q "$zip" -d "$tmp"
  else
    python3 -m zipfile -e "$zip" "$tmp"
  fi
  # python's zipfile drops exec bits; harmless to (re)set with unzip too.
  chmod +x "$tmp/$ES_DISTRIBUTION-$ES_VERSION"/bin/*
  rm -rf "$DIST"
  mv "$tmp/$ES_DISTRIBUTION-$ES_VERSION" "$DIST"
  rmdir "$tmp"
  rm -rf "$dl" # ~/.m2 keeps the canonical copy
}

# Both servers refuse to run as root: use a dedicated unprivileged system account.
ensure_user() {
  id -u "$ES_USER" >/dev/null 2>&1 && return 0
  log "creating system user $ES_USER"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$ES_USER"
}

as_es() {
  if [[ $EUID -eq 0 ]]; then runuser -u "$ES_USER" -- "$@"; else "$@"; fi
}

# Fresh per-port config/ each start: the server writes its keystore there, and
# a copy another run may have rewritten (security auto-config) must not stick.
fresh_config() {
  rm -rf "$RUN/config"
  cp -r "$DIST/config" "$RUN/config"
  if [[ $ES_DISTRIBUTION == opensearch ]]; then
    # OpenSearch's jvm.options holds paths relative to its home (gc log,
    # heap dumps, crash files): point them at this port's state instead.
    sed -i -e "s#=logs/#=$RUN/logs/#g" -e "s#HeapDumpPath=data#HeapDumpPath=$RUN/data#" \
      "$RUN/config/jvm.options"
  fi
  [[ $EUID -eq 0 ]] && chown -R "$ES_USER": "$RUN/config"
  return 0
}

cmd_start() {
  # One start at a time per port (test sessions run side by side): a second
  # waits here, then finds the server up.
  exec 9>"${TMPDIR:-/tmp}/rerank-proxy-start-$ES_PORT.lock"
  flock 9
  if is_up; then
    echo "$PRODUCT $ES_VERSION already running at $URL" >&2
    echo "$URL"
    return 0
  fi
  # Something else on the port would make the server fail with a confusing bind error.
  if (exec 3<>"/dev/tcp/127.0.0.1/$ES_PORT") 2>/dev/null; then
    running_pid >/dev/null || die "port $ES_PORT is taken by something that is not our $PRODUCT $ES_VERSION"
  fi

  local java_home started_at pid workdir launch_failed=""
  java_home="$(find_java_home)"
  [[ -x "$java_home/bin/java" ]] || die "ES_JAVA_HOME=$java_home has no bin/java"

  mkdir -p "$ES_HOME_DIR"
  ensure_dist
  started_at=$SECONDS # the timeout covers start-up, not the download
  mkdir -p "$RUN"/{data,logs,tmp}

  local -a extra=()
  # The Elasticsearch zip ships x-pack-security, which is on by default and
  # would auto-generate TLS certs (https + auth). Plain http is what tests
  # want. Only pass the setting when the module exists: unknown settings are
  # fatal. (OpenSearch's integ-test zip has no security plugin at all.)
  [[ -d "$DIST/modules/x-pack-security" ]] && extra+=(-E xpack.security.enabled=false)

  if [[ $EUID -eq 0 ]]; then
    ensure_user
    chown "$ES_USER": "$ES_HOME_DIR"
    chown -R "$ES_USER": "$DIST" "$RUN"
    runuser -u "$ES_USER" -- test -r "$DIST/bin/$ES_DISTRIBUTION" -a -w "$RUN" ||
      die "user $ES_USER cannot reach $ES_HOME_DIR (a parent dir is not world-traversable?); pick another ES_HOME_DIR"
  fi

  if pid="$(running_pid)"; then
    log "process $pid already starting; waiting for it"
  else
    fresh_config
    # Relative JVM paths must land in a dir the server can write to:
    # Elasticsearch's (gc.log, hs_err) are relative to the working dir, so run
    # it from this port's logs; OpenSearch's launcher needs its home as the
    # working dir (bin/, agent/), its log paths were made absolute above.
    workdir="$RUN/logs"
    [[ $ES_DISTRIBUTION == opensearch ]] && workdir="$DIST"
    log "starting $PRODUCT $ES_VERSION on $URL (java: $java_home, state: $RUN)"
    # -d waits until the node started (or failed) then detaches.
    (cd "$workdir" && as_es env \
      "${ENV_PREFIX}_JAVA_HOME=$java_home" \
      "${ENV_PREFIX}_PATH_CONF=$RUN/config" \
      "${ENV_PREFIX}_TMPDIR=$RUN/tmp" \
      "${ENV_PREFIX}_JAVA_OPTS=-Xms$ES_HEAP -Xmx$ES_HEAP ${ES_JAVA_OPTS:-}" \
      "$DIST/bin/$ES_DISTRIBUTION" -d -p "$PIDFILE" \
      -E cluster.name=rerank-proxy-test \
      -E discovery.type=single-node \
      -E network.host=127.0.0.1 \
      -E http.port="$ES_PORT" \
      -E transport.port="$TRANSPORT_PORT" \
      -E path.data="$RUN/data" \
      -E path.logs="$RUN/logs" \
      -E cluster.routing.allocation.disk.threshold_enabled=false \
      ${extra[@]+"${extra[@]}"} \
      >"$RUN/startup.out" 2>&1) 9>&- || launch_failed=1 # the server must not hold the lock
  fi

  # Give up early if the server died instead of waiting out the timeout:
  # Elasticsearch's -d fails when the node does; OpenSearch's -d returns as
  # soon as the JVM is forked, before the node writes its pidfile, so there
  # only a pidfile seen alive and then gone means it died.
  local seen=""
  while [[ -z $launch_failed ]] && ((SECONDS - started_at < ES_START_TIMEOUT)); do
    if curl -fsS -o /dev/null --max-time 5 \
      "$URL/_cluster/health?wait_for_status=yellow&timeout=5s" 2>/dev/null && is_up; then
      echo "$PRODUCT $ES_VERSION up at $URL (took $((SECONDS - started_at))s)" >&2
      echo "$URL"
      return 0
    fi
    if running_pid >/dev/null; then
      seen=1
    elif [[ -n $seen ]]; then
      break
    fi
    sleep 1
  done

  log "$PRODUCT $ES_VERSION did not come up on $URL"
  [[ -s "$RUN/startup.out" ]] && { echo "--- $RUN/startup.out" >&2; tail -n 40 "$RUN/startup.out" >&2; }
  [[ -f "$LOGFILE" ]] && { echo "--- $LOGFILE" >&2; tail -n 40 "$LOGFILE" >&2; }
  # Don't leave a half-working node behind.
  running_pid >/dev/null && cmd_stop >&2
  exit 1
}

cmd_stop() {
  local pid i
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    echo "$PRODUCT $ES_VERSION not running on port $ES_PORT (no live pidfile in $RUN)"
    return 0
  fi
  kill -TERM "$pid"
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM for 60s; sending SIGKILL"
    kill -KILL "$pid"
    sleep 1
  fi
  rm -f "$PIDFILE"
  echo "$PRODUCT $ES_VERSION on port $ES_PORT stopped"
}

cmd_status() {
  if is_up; then
    echo "$PRODUCT $ES_VERSION up at $URL"
  else
    echo "$PRODUCT $ES_VERSION not responding at $URL"
    return 1
  fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  url) echo "$URL" ;;
  *)
    echo "usage: $0 start|stop|status|url" >&2
    exit 2
    ;;
esac
