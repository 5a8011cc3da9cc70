#!/usr/bin/env bash
# CPU time per pass-through request (user and system, of every process of
# the proxy), Portico against NGINX. Throughput rounds on a shared 2-core
# machine spread by 20% to 80%; the CPU a proxy spends on a fixed number of
# requests spreads far less, and on a saturated core it is what sets the
# requests per second. Each proxy is pinned to CPU 1, the upstream and
# h2load to CPU 0, as in run.sh; each round sends N requests over 64
# keep-alive connections, and the proxies take turns, ROUNDS times.
#
# Run from the project root after `cargo build --release` and once
# benches/passthrough/run.sh (which builds the upstream):
#     benches/passthrough/cpu.sh [PATH]     (default /obj/1k; N=200000 ROUNDS=3)
#     CAP=50 benches/passthrough/cpu.sh     each proxy held to 50% of one core
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bench_dir=${BENCH_DIR:-${TMPDIR:-/tmp}/portico-bench}
ceiling=$bench_dir/ceiling-target/release/ceiling
portico=${PORTICO_BIN:-$root/target/release/portico}
path=${1:-/obj/1k}
n=${N:-200000}
rounds=${ROUNDS:-3}
[[ -x $ceiling ]] || { echo "build the upstream first: benches/passthrough/run.sh" >&2; exit 1; }
command -v h2load >/dev/null || { echo "missing h2load (nghttp2-client)" >&2; exit 1; }
mkdir -p /tmp/portico-nginx-pass
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
taskset -c 0 "$ceiling" 127.0.0.1:8095 >/dev/null 2>&1 &
pids+=($!)
wrap_portico=() wrap_nginx=()
if [[ -n ${CAP:-} ]]; then
  wrap_portico=("$here/capped.sh" portico-pass-cap "$CAP")
  wrap_nginx=("$here/capped.sh" nginx-pass-cap "$CAP")
fi
RUST_LOG=warn taskset -c 1 "${wrap_portico[@]}" "$portico" run "$here/portico.policy" --threads 1 --log-format plain >/dev/null 2>&1 &
portico_pid=$!
pids+=($portico_pid)
taskset -c 1 "${wrap_nginx[@]}" nginx -p /tmp/portico-nginx-pass/ -c "$here/nginx.conf" >/dev/null 2>&1 &
nginx_pid=$!
pids+=($nginx_pid)
for port in 8184 8181; do
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port$path" && break; sleep 0.1; done
done
tck=$(getconf CLK_TCK)
# utime + stime, in clock ticks, of a process and its children's threads.
cpu_of() {
  local total=0 p
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $total
}
procs_of() { echo "$1" $(pgrep -P "$1" || true); }
measure() {
  local name=$1 port=$2 pid=$3 before after ok
  local procs
  procs=$(procs_of "$pid")
  taskset -c 0 h2load --h1 -n 20000 -c 64 "http://127.0.0.1:$port$path" >/dev/null
  before=$(cpu_of $procs)
  ok=$(taskset -c 0 h2load --h1 -n "$n" -c 64 "http://127.0.0.1:$port$path" | awk '/^requests:/ {print $8}')
  after=$(cpu_of $procs)
  awk -v n="$ok" -v t=$((after - before)) -v tck="$tck" -v name="$name" \
    'BEGIN { printf "%-8s %8d requests  %6.2f us of CPU per request\n", name, n, t / tck * 1e6 / n }'
}
for _ in $(seq "$rounds"); do
  measure portico 8184 $portico_pid
  measure nginx 8181 $nginx_pid
done
