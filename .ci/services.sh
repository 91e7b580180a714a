# Sourced by .ci/test: PostgreSQL and Redis for the test suite.
#
# Where 127.0.0.1:5432 and 127.0.0.1:6379 answer (as on CI), those servers are used. Where they
# do not (a laptop, a fresh VM), the Debian packages are installed if missing and throwaway
# servers are started in a temporary folder on free ports; the suite is pointed at them with
# SPINE_TRIAGE_TEST_POSTGRES / SPINE_TRIAGE_TEST_REDIS, and they are stopped on exit.

PG_BIN=/usr/lib/postgresql/15/bin
_st_services_dir=""

_answers() {  # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

_stop_services() {
  [ -n "$_st_services_dir" ] || return 0
  if [ -f "$_st_services_dir/pg/data/postmaster.pid" ]; then
    _as_postgres "$PG_BIN/pg_ctl" -D "$_st_services_dir/pg/data" -w -m fast stop >/dev/null || true
  fi
  if [ -f "$_st_services_dir/redis.pid" ]; then
    kill "$(cat "$_st_services_dir/redis.pid")" 2>/dev/null || true
  fi
  rm -rf "$_st_services_dir"
}

ensure_services() {
  local need_pg=0 need_redis=0
  _answers 127.0.0.1 5432 || need_pg=1
  _answers 127.0.0.1 6379 || need_redis=1
  if [ $need_pg = 0 ] && [ $need_redis = 0 ]; then
    echo "== services: PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379"
    return 0
  fi
  local packages=()
  [ $need_pg = 1 ] && [ ! -x "$PG_BIN/initdb" ] && packages+=(postgresql)
  [ $need_redis = 1 ] && ! command -v redis-server >/dev/null && packages+=(redis-server)
  if [ "${#packages[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${packages[*]}"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
  fi
  _st_services_dir=$(mktemp -d /tmp/spine-triage-services.XXXXXX)
  chmod 755 "$_st_services_dir"
  trap _stop_services EXIT
  if [ $need_pg = 1 ]; then
    local port; port=$(_free_port)
    mkdir -p "$_st_services_dir/pg"
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$_st_services_dir/pg"
    _as_postgres "$PG_BIN/initdb" -D "$_st_services_dir/pg/data" -A trust -U postgres --no-sync >/dev/null
    _as_postgres "$PG_BIN/pg_ctl" -D "$_st_services_dir/pg/data" -w -l "$_st_services_dir/pg/server.log" \
      -o "-p $port -k $_st_services_dir/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
    export SPINE_TRIAGE_TEST_POSTGRES="postgresql+psycopg2://postgres@127.0.0.1:$port"
    echo "== services: throwaway PostgreSQL on 127.0.0.1:$port (nothing answered on 5432)"
  fi
  if [ $need_redis = 1 ]; then
    local port; port=$(_free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$_st_services_dir" --daemonize yes --pidfile "$_st_services_dir/redis.pid" \
      --logfile "$_st_services_dir/redis.log"
    export SPINE_TRIAGE_TEST_REDIS="redis://127.0.0.1:$port/0"
    echo "== services: throwaway Redis on 127.0.0.1:$port (nothing answered on 6379)"
  fi
}
