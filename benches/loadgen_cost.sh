#!/usr/bin/env bash
# What a cache hit costs the load generator, per server: wrk's system calls
# and CPU time per response, each server alone on CPU 1 and wrk on CPU 0,
# with the object already cached (Portico, Varnish, NGINX with the shared
# harness's configurations, and the harness's bare hyper server).
#
# Run from the project root after `cargo build --release` and once
# ../shared/bench/bench.sh (which builds the bare server):
#     benches/loadgen_cost.sh [PATH]      (default /obj/256k; D=5 ROUNDS=2)
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pb=${BENCH_SH_DIR:-$root/../shared/bench}
bench_dir=${BENCH_DIR:-${TMPDIR:-/tmp}/portico-bench}
run=$(mktemp -d)
path=${1:-/obj/256k}
d=${D:-5}
portico=${PORTICO_BIN:-target/release/portico}
for tool in wrk perf taskset nginx varnishd python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
mkdir -p "$run/nginx_tmp" "$run/nginx_cache" "$run/portico-cache"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$run"
}
trap cleanup EXIT
ORIGIN_DELAY_MS=50 taskset -c 0 python3 "$pb/origin/origin.py" 127.0.0.1 9000 >/dev/null 2>&1 &
pids+=($!)
RUST_LOG=warn,portico::access=off taskset -c 1 "$portico" run -b 127.0.0.1:9000 \
  --listen 127.0.0.1:8083 --cache-dir "$run/portico-cache" >/dev/null 2>&1 &
pids+=($!)
taskset -c 1 varnishd -F -a 127.0.0.1:8082 -f "$pb/conf/varnish.vcl" -s malloc,1G \
  -n "$run/varnish" -T 127.0.0.1:0 >/dev/null 2>&1 &
pids+=($!)
taskset -c 1 nginx -c "$pb/conf/nginx.conf" -p "$run/" -g 'daemon off;' >/dev/null 2>&1 &
pids+=($!)
targets="portico:8083 varnish:8082 nginx:8081"
if [[ -x $bench_dir/ceiling-target/release/ceiling ]]; then
  taskset -c 1 "$bench_dir/ceiling-target/release/ceiling" 127.0.0.1:8090 >/dev/null 2>&1 &
  pids+=($!)
  targets="$targets ceiling:8090"
fi
sleep 2
for t in $targets; do
  for _ in 1 2; do curl -s -o /dev/null "http://127.0.0.1:${t#*:}$path"; done
done
measure() {
  local name=$1 port=$2 out n calls cpu
  taskset -c 0 wrk -t1 -c64 -d2s "http://127.0.0.1:$port$path" >/dev/null
  out=$( { perf stat -x, -e raw_syscalls:sys_enter -e task-clock -- \
    taskset -c 0 wrk -t1 -c64 -d"${d}s" "http://127.0.0.1:$port$path"; } 2>&1 )
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  calls=$(echo "$out" | awk -F, '/raw_syscalls/ {print $1}')
  cpu=$(echo "$out" | awk -F, '/task-clock/ {print $1}')
  awk -v name="$name" -v n="$n" -v calls="$calls" -v cpu="$cpu" -v d="$d" 'BEGIN {
    printf "%-8s %7.0f req/s  wrk: %5.1f system calls and %6.1f us of CPU per response (%.0f%% of its core)\n",
      name, n / d, calls / n, cpu * 1000 / n, cpu / 10 / d }'
}
for _ in $(seq "${ROUNDS:-2}"); do
  for t in $targets; do measure "${t%%:*}" "${t#*:}"; done
done
