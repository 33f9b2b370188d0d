#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the prediction store's tests (tests/test_store.py): a real server, never a mock.
#
#   scripts/postgres.sh start   # initdb if needed, start, create database vggnet_test; prints the URL on stdout
#   scripts/postgres.sh stop    # stop the server (the folder stays; rm -rf it to throw the cluster away)
#
# The cluster lives in ${VGGNET_PG_DIR:-/tmp/vggnet-pg} (data in data/, the unix socket and the log beside it) and
# listens on that socket and on 127.0.0.1:${VGGNET_PG_PORT:-55432}; when that port is taken by something else, a
# free one is picked and remembered in the folder. The superuser is vggnet, password vggnet over TCP (trust on the
# socket): fine for a test cluster on localhost, nothing else. PostgreSQL refuses to run as root, so as root the
# server runs as Debian's postgres user. Needs Debian's `postgresql` package (its binaries, not its own cluster).
set -euo pipefail

cmd=${1:-}
dir=${VGGNET_PG_DIR:-/tmp/vggnet-pg}
user=vggnet password=vggnet database=vggnet_test

die() { echo "postgres.sh: $*" >&2; exit 1; }

bin=${VGGNET_PG_BIN:-$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)}
[ -n "$bin" ] && [ -x "$bin/initdb" ] || die "no PostgreSQL server binaries (apt-get install postgresql)"

# Run a server binary as a user PostgreSQL accepts: ourselves, or postgres when we are root.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "running as root and there is no postgres user to run the server as"
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

url() { echo "postgresql+psycopg://$user:$password@127.0.0.1:$(cat "$dir/port")/$database"; }

start() {
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; fi
    chmod 700 "$dir"
    if as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1; then
        url; return    # already running: the same URL again
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        [ -z "$(ls -A "$dir")" ] || die "$dir is neither empty nor a cluster made by this script; refusing to touch it"
        as_owner bash -c "printf '%s\n' '$password' >'$dir/pwfile'"
        as_owner "$bin/initdb" -D "$dir/data" -U "$user" --pwfile="$dir/pwfile" --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
        rm -f "$dir/pwfile"
    fi
    local port=${VGGNET_PG_PORT:-55432}
    if port_in_use "$port"; then
        [ -z "${VGGNET_PG_PORT:-}" ] || die "port $port (VGGNET_PG_PORT) is in use"
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    as_owner bash -c "echo $port >'$dir/port'"
    as_owner "$bin/pg_ctl" start -w -t 60 -D "$dir/data" -l "$dir/postgres.log" \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" >/dev/null \
        || { tail -n 20 "$dir/postgres.log" >&2; die "the server did not start (log: $dir/postgres.log)"; }
    if ! as_owner "$bin/psql" -h "$dir" -p "$port" -U "$user" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1; then
        as_owner "$bin/createdb" -h "$dir" -p "$port" -U "$user" "$database"
    fi
    url
}

stop() {
    [ -f "$dir/data/PG_VERSION" ] || { echo "postgres.sh: no cluster in $dir" >&2; return 0; }
    if as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" stop -w -m fast -D "$dir/data" >/dev/null
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop   (cluster folder: \$VGGNET_PG_DIR, default /tmp/vggnet-pg)" ;;
esac
