#!/usr/bin/env bash
# A real S3 server for the object-storage tests: OpenStack Swift (Debian's swift 2.30 packages)
# with its s3api middleware, on one node, its data in a plain directory.
#
#   scripts/s3-server.sh install   apt-get the packages when missing (about 30 s)
#   scripts/s3-server.sh start     rings, configs, memcached and the four servers; waits for health
#   scripts/s3-server.sh stop      kills what start started (PID files)
#   scripts/s3-server.sh status    prints the endpoint and credentials when it is up
#
# Everything lives in $KVPACK_S3_DIR (default /tmp/kvpack-s3): configs, rings, the storage
# directory, PID files and logs. The servers read their cluster settings (the hash suffix) from
# /etc/swift/swift.conf, which the packages install; the rings and every other setting come from
# the state directory (swift_dir). Credentials (tempauth): access key test:tester, secret
# testing; endpoint http://127.0.0.1:$KVPACK_S3_PORT (default 18080), region us-east-1.
set -euo pipefail
DIR=${KVPACK_S3_DIR:-/tmp/kvpack-s3}
PORT=${KVPACK_S3_PORT:-18080}
OBJECT_PORT=$((PORT - 1880))      # 16200
CONTAINER_PORT=$((OBJECT_PORT + 1))
ACCOUNT_PORT=$((OBJECT_PORT + 2))
MEMCACHED_PORT=$((PORT - 6769))   # 11311
SERVERS="object container account proxy"

install() {
  if command -v swift-proxy-server > /dev/null && command -v memcached > /dev/null \
      && [ -d /usr/lib/python3/dist-packages/swift/common/middleware/s3api ]; then
    echo "s3-server: OpenStack Swift and memcached present"
    return
  fi
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends swift swift-proxy swift-object swift-container swift-account \
    python3-swift memcached > /dev/null
}

configure() {
  mkdir -p "$DIR/srv/d1" "$DIR/run" "$DIR/log"
  local common="[DEFAULT]
bind_ip = 127.0.0.1
workers = 0
mount_check = false
swift_dir = $DIR
devices = $DIR/srv
log_facility = LOG_LOCAL0
log_level = WARNING
"
  printf '%sbind_port = %s\n\n[pipeline:main]\npipeline = object-server\n\n[app:object-server]\nuse = egg:swift#object\n' \
    "$common" "$OBJECT_PORT" > "$DIR/object-server.conf"
  printf '%sbind_port = %s\n\n[pipeline:main]\npipeline = container-server\n\n[app:container-server]\nuse = egg:swift#container\n' \
    "$common" "$CONTAINER_PORT" > "$DIR/container-server.conf"
  printf '%sbind_port = %s\n\n[pipeline:main]\npipeline = account-server\n\n[app:account-server]\nuse = egg:swift#account\n' \
    "$common" "$ACCOUNT_PORT" > "$DIR/account-server.conf"
  # s3api before tempauth (it turns the S3 signature into a Swift identity), slo for multipart
  # uploads, cache (memcached) for tokens and account info: without it a ranged GET took 17 ms.
  cat > "$DIR/proxy-server.conf" << EOF
${common}bind_port = $PORT

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:s3api]
use = egg:swift#s3api
location = us-east-1
s3_acl = false

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = testing .admin

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$MEMCACHED_PORT

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
EOF
  if [ ! -f "$DIR/object.ring.gz" ]; then
    for ring in object:$OBJECT_PORT container:$CONTAINER_PORT account:$ACCOUNT_PORT; do
      local name=${ring%%:*} port=${ring##*:}
      (cd "$DIR" && swift-ring-builder "$name.builder" create 10 1 1 > /dev/null \
        && swift-ring-builder "$name.builder" add r1z1-127.0.0.1:"$port"/d1 100 > /dev/null \
        && swift-ring-builder "$name.builder" rebalance > /dev/null)
    done
  fi
}

up() { curl -fs "http://127.0.0.1:$PORT/healthcheck" > /dev/null 2>&1; }

start() {
  install
  if up; then
    if [ -f "$DIR/run/proxy.pid" ] && kill -0 "$(cat "$DIR/run/proxy.pid")" 2> /dev/null; then
      echo "s3-server: already up at http://127.0.0.1:$PORT"
      return
    fi
    echo "s3-server: port $PORT answers, but not a server started from $DIR (stop it, or set KVPACK_S3_PORT)" >&2
    exit 1
  fi
  configure
  # Daemons get no inherited stdout/stderr: a caller reading this script's output to its end
  # would otherwise wait for them.
  memcached -u root -l 127.0.0.1 -p "$MEMCACHED_PORT" -P "$DIR/run/memcached.pid" -d > /dev/null 2>&1 < /dev/null
  for s in $SERVERS; do
    "swift-$s-server" "$DIR/$s-server.conf" > "$DIR/log/$s.log" 2>&1 < /dev/null &
    echo $! > "$DIR/run/$s.pid"
  done
  for _ in $(seq 1 100); do
    up && { status; return; }
    sleep 0.1
  done
  echo "s3-server: did not become healthy in 10 s; logs in $DIR/log" >&2
  tail -n 20 "$DIR"/log/*.log >&2
  stop
  exit 1
}

stop() {
  # The servers (workers = 0) do not exit on SIGTERM: TERM, a moment, then KILL.
  local pids=()
  for s in $SERVERS memcached; do
    local pid="$DIR/run/$s.pid"
    [ -f "$pid" ] && { pids+=("$(cat "$pid")"); rm -f "$pid"; }
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2> /dev/null || true
    for _ in $(seq 1 10); do
      kill -0 "${pids[@]}" 2> /dev/null || break
      sleep 0.1
    done
    kill -9 "${pids[@]}" 2> /dev/null || true
  fi
  echo "s3-server: stopped"
}

status() {
  if up; then
    echo "s3-server: up at http://127.0.0.1:$PORT (region us-east-1, access key test:tester, secret testing; data in $DIR/srv)"
  else
    echo "s3-server: down"
    return 1
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
