#!/usr/bin/env bash
# A throwaway Prometheus scraping one `vggnet serve`, with deploy/prometheus-rules.yaml loaded: a real server for the
# dashboard's and the rules' queries (tests/test_deploy_monitoring.py, scripts/dashboard_screenshot.py), never a mock.
#
#   scripts/prometheus.sh start HOST:PORT   # scrape http://HOST:PORT/metrics; prints Prometheus' URL on stdout
#   scripts/prometheus.sh stop              # stop it (the folder stays; rm -rf it to throw the data away)
#
# Everything lives in ${VGGNET_PROM_DIR:-/tmp/vggnet-prom}: prometheus.yml, data/, prometheus.log and the pid. It
# listens on 127.0.0.1:${VGGNET_PROM_PORT:-59090} (a free port when that one is taken and VGGNET_PROM_PORT is unset)
# and scrapes and evaluates the rules every ${VGGNET_PROM_SCRAPE:-1s}. Needs Debian's `prometheus` package (its
# binary; its own service is not used).
set -euo pipefail

cmd=${1:-}
dir=${VGGNET_PROM_DIR:-/tmp/vggnet-prom}
scrape=${VGGNET_PROM_SCRAPE:-1s}
root=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "prometheus.sh: $*" >&2; exit 1; }

bin=${VGGNET_PROMETHEUS:-$(command -v prometheus || true)}

running() { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    local target=${1:-}
    [ -n "$target" ] || die "usage: $0 start HOST:PORT   (the vggnet server to scrape)"
    [ -n "$bin" ] && [ -x "$bin" ] || die "no prometheus binary (apt-get install prometheus)"
    mkdir -p "$dir"
    if running; then
        echo "http://127.0.0.1:$(cat "$dir/port")"; return    # already running: the same URL again
    fi
    local port=${VGGNET_PROM_PORT:-59090}
    if port_in_use "$port"; then
        [ -z "${VGGNET_PROM_PORT:-}" ] || die "port $port (VGGNET_PROM_PORT) is in use"
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    cat >"$dir/prometheus.yml" <<EOF
global:
  scrape_interval: $scrape
  scrape_timeout: $scrape
  evaluation_interval: $scrape
rule_files:
  - $root/deploy/prometheus-rules.yaml
scrape_configs:
  - job_name: vggnet
    static_configs:
      - targets: ["$target"]
EOF
    echo "$port" >"$dir/port"
    "$bin" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
        --web.listen-address="127.0.0.1:$port" --log.level=warn >"$dir/prometheus.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    for _ in $(seq 300); do
        if curl -fsS "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; then
            echo "http://127.0.0.1:$port"; return
        fi
        running || break
        sleep 0.1
    done
    tail -n 20 "$dir/prometheus.log" >&2
    stop
    die "Prometheus did not become ready (log: $dir/prometheus.log)"
}

stop() {
    running || { rm -f "$dir/pid"; return 0; }
    local pid; pid=$(cat "$dir/pid")
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$dir/pid"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
}

case "$cmd" in
    start) start "${2:-}" ;;
    stop) stop ;;
    *) die "usage: $0 start HOST:PORT | stop   (folder: \$VGGNET_PROM_DIR, default /tmp/vggnet-prom)" ;;
esac
