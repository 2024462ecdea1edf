#!/usr/bin/env bash
# Start/stop a throw-away local Elasticsearch (no Docker needed) for tests,
# CI and local development. Listens on 127.0.0.1 only.
#
#   scripts/elasticsearch.sh start|stop|status|url
#
# Knobs (env):
#   ES_VERSION   (8.19.21)  ES_PORT (9200)  ES_HEAP (512m)
#   ES_HOME_DIR  where the distribution is unpacked; run-time state (data, logs,
#                config, pid) lives in $ES_HOME_DIR/run-$ES_PORT, so several
#                ports can run side by side.
#                Default: ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-proxy/elasticsearch-$ES_VERSION,
#                or /var/cache/rerank-proxy/elasticsearch-$ES_VERSION as root
#                (root's home is usually 0700, so the unprivileged ES user
#                could not read it).
#   ES_JAVA_HOME JDK to run with (default: a JDK 17 under /usr/lib/jvm, else
#                $JAVA_HOME, else wherever `java` on PATH lives).
#   ES_USER      account ES runs as when invoked as root (rerankes).
set -euo pipefail

ES_VERSION="${ES_VERSION:-8.19.21}"
ES_PORT="${ES_PORT:-9200}"
ES_HEAP="${ES_HEAP:-512m}"
ES_USER="${ES_USER:-rerankes}"
ES_START_TIMEOUT="${ES_START_TIMEOUT:-120}"
if [[ -z "${ES_HOME_DIR:-}" ]]; then
  if [[ $EUID -eq 0 ]]; then
    ES_HOME_DIR="/var/cache/rerank-proxy/elasticsearch-$ES_VERSION"
  else
    ES_HOME_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/rerank-proxy/elasticsearch-$ES_VERSION"
  fi
fi

URL="http://127.0.0.1:$ES_PORT"
DIST="$ES_HOME_DIR/elasticsearch-$ES_VERSION"   # unpacked zip, shared by all ports
RUN="$ES_HOME_DIR/run-$ES_PORT"                 # per-port state
PIDFILE="$RUN/elasticsearch.pid"
LOGFILE="$RUN/logs/rerank-proxy-test.log"        # named after cluster.name
# Transport port must not clash between instances; only used internally.
TRANSPORT_PORT=$((ES_PORT + 100))

log() { echo "elasticsearch.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Not `GET /`: the integ-test zip lacks the rest-root module, so / is a 405.
# Require ES's product header so another HTTP server on the port doesn't count.
is_up() {
  local headers
  headers="$(curl -fsS -D - -o /dev/null --max-time 2 "$URL/_cluster/health" 2>/dev/null)" || return 1
  grep -qi '^x-elastic-product: *elasticsearch' <<<"$headers"
}

# PID from our pidfile if that process is still alive and really is ES
# (guards against a stale pidfile whose PID got reused).
running_pid() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid="$(tr -dc '0-9' <"$PIDFILE")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'org.elasticsearch' || return 1
  echo "$pid"
}

find_java_home() {
  local d
  if [[ -n "${ES_JAVA_HOME:-}" ]]; then echo "$ES_JAVA_HOME"; return; fi
  # ES 8 needs Java >= 17; prefer the distro's 17, a known-good combination.
  for d in /usr/lib/jvm/java-17-openjdk-* /usr/lib/jvm/*17*; do
    [[ -x "$d/bin/java" ]] && { echo "$d"; return; }
  done
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME"; return; fi
  d="$(command -v java)" || die "no JDK found: install openjdk-17-jdk-headless or set ES_JAVA_HOME"
  d="$(readlink -f "$d")"
  echo "${d%/bin/java}"
}

# Download (via Maven, which caches in ~/.m2) and unpack once.
ensure_dist() {
  [[ -x "$DIST/bin/elasticsearch" ]] && return 0
  local dl="$ES_HOME_DIR/download" zip tmp
  zip="$dl/elasticsearch-$ES_VERSION.zip"
  mkdir -p "$dl"
  if [[ ! -s "$zip" ]]; then
    command -v mvn >/dev/null || die "mvn not found (needed to fetch Elasticsearch $ES_VERSION)"
    log "fetching org.elasticsearch.distribution.integ-test-zip:elasticsearch:$ES_VERSION via Maven"
    # stdout -> stderr: `start` prints only the URL on stdout.
    mvn -B -q dependency:copy \
      -Dartifact="org.elasticsearch.distribution.integ-test-zip:elasticsearch:$ES_VERSION:zip" \
      -DoutputDirectory="$dl" >&2
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
  chmod +x "$tmp/elasticsearch-$ES_VERSION"/bin/*
  rm -rf "$DIST"
  mv "$tmp/elasticsearch-$ES_VERSION" "$DIST"
  rmdir "$tmp"
  rm -rf "$dl"   # ~/.m2 keeps the canonical copy
}

# ES 8 refuses to run as root: use a dedicated unprivileged system account.
ensure_user() {
  id -u "$ES_USER" >/dev/null 2>&1 && return 0
  log "creating system user $ES_USER"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$ES_USER"
}

as_es() {
  if [[ $EUID -eq 0 ]]; then runuser -u "$ES_USER" -- "$@"; else "$@"; fi
}

cmd_start() {
  if is_up; then
    echo "Elasticsearch already running at $URL"
    echo "$URL"
    return 0
  fi
  # Something else on the port would make ES fail with a confusing bind error.
  if (exec 3<>"/dev/tcp/127.0.0.1/$ES_PORT") 2>/dev/null; then
    running_pid >/dev/null || die "port $ES_PORT is taken by something that is not our Elasticsearch"
  fi

  local java_home started_at pid
  java_home="$(find_java_home)"
  [[ -x "$java_home/bin/java" ]] || die "ES_JAVA_HOME=$java_home has no bin/java"

  mkdir -p "$ES_HOME_DIR"
  ensure_dist
  started_at=$SECONDS   # the timeout covers ES startup, not the download
  mkdir -p "$RUN"/{data,logs,tmp}

  # This zip does ship x-pack-security, which is on by default and would
  # auto-generate TLS certs (https + auth). Plain http is what tests want.
  # Only pass the setting when the module exists: unknown settings are fatal.
  local -a extra=()
  [[ -d "$DIST/modules/x-pack-security" ]] && extra+=(-E xpack.security.enabled=false)

  if [[ $EUID -eq 0 ]]; then
    ensure_user
    chown "$ES_USER": "$ES_HOME_DIR"
    chown -R "$ES_USER": "$DIST" "$RUN"
    runuser -u "$ES_USER" -- test -r "$DIST/bin/elasticsearch" -a -w "$RUN" ||
      die "user $ES_USER cannot reach $ES_HOME_DIR (a parent dir is not world-traversable?); pick another ES_HOME_DIR"
  fi

  if pid="$(running_pid)"; then
    log "process $pid already starting; waiting for it"
  else
    # Fresh per-port config/ each start: ES writes its keystore there, and a
    # copy another run may have rewritten (security auto-config) must not stick.
    rm -rf "$RUN/config"
    cp -r "$DIST/config" "$RUN/config"
    [[ $EUID -eq 0 ]] && chown -R "$ES_USER": "$RUN/config"
    log "starting Elasticsearch $ES_VERSION on $URL (java: $java_home, state: $RUN)"
    # ES's -d waits until the node started (or failed) then detaches; cd so
    # relative JVM paths (gc.log, hs_err) land in a dir ES can write to.
    (cd "$RUN/logs" && as_es env \
      ES_JAVA_HOME="$java_home" \
      ES_PATH_CONF="$RUN/config" \
      ES_TMPDIR="$RUN/tmp" \
      ES_JAVA_OPTS="-Xms$ES_HEAP -Xmx$ES_HEAP ${ES_JAVA_OPTS:-}" \
      "$DIST/bin/elasticsearch" -d -p "$PIDFILE" \
      -E cluster.name=rerank-proxy-test \
      -E discovery.type=single-node \
      -E network.host=127.0.0.1 \
      -E http.port="$ES_PORT" \
      -E transport.port="$TRANSPORT_PORT" \
      -E path.data="$RUN/data" \
      -E path.logs="$RUN/logs" \
      -E cluster.routing.allocation.disk.threshold_enabled=false \
      ${extra[@]+"${extra[@]}"} \
      >"$RUN/startup.out" 2>&1) || true
  fi

  while ((SECONDS - started_at < ES_START_TIMEOUT)); do
    if curl -fsS -o /dev/null --max-time 5 \
      "$URL/_cluster/health?wait_for_status=yellow&timeout=5s" 2>/dev/null; then
      echo "Elasticsearch $ES_VERSION up at $URL (took $((SECONDS - started_at))s)" >&2
      echo "$URL"
      return 0
    fi
    # Give up early if the process is gone instead of waiting out the timeout.
    running_pid >/dev/null || { sleep 1; running_pid >/dev/null || is_up || break; }
    sleep 1
  done

  log "Elasticsearch did not come up on $URL"
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
    echo "Elasticsearch not running on port $ES_PORT (no live pidfile in $RUN)"
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
  echo "Elasticsearch on port $ES_PORT stopped"
}

cmd_status() {
  if is_up; then
    echo "Elasticsearch up at $URL"
  else
    echo "Elasticsearch not responding at $URL"
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
