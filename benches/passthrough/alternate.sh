#!/usr/bin/env bash
# Pass-through requests per second of two proxies, measured in short turns
# that alternate (A, B, A, B, ...), each turn with a fresh proxy: drift of
# the machine then moves both alike, and one turn's figures can be paired
# with the next. A proxy is a path to a Portico binary or the word `nginx`.
# Each proxy is pinned to CPU 1, wrk and the upstream to CPU 0, as in run.sh.
#
# Run from the project root after `cargo build --release` and once
# benches/passthrough/run.sh (which builds the upstream):
#     benches/passthrough/alternate.sh target/release/portico nginx
#     benches/passthrough/alternate.sh /tmp/portico-before target/release/portico
# Knobs: TURNS=4 (pairs), DURATION=5 (seconds a turn), CONNS=64, SIZE=1k,
# NGINX_WORKERS=auto, CAP (a percentage of one core, as in run.sh).
#
# Prints one line a turn: requests/s, and the CPU the proxy's processes
# spent per request (user and system, in microseconds).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bench_dir=${BENCH_DIR:-${TMPDIR:-/tmp}/portico-bench}
ceiling=$bench_dir/ceiling-target/release/ceiling
[[ $# -eq 2 ]] || { echo "usage: $0 PROXY_A PROXY_B" >&2; exit 2; }
[[ -x $ceiling ]] || { echo "build the upstream first: benches/passthrough/run.sh" >&2; exit 1; }
command -v wrk >/dev/null || { echo "missing wrk" >&2; exit 1; }
turns=${TURNS:-4} duration=${DURATION:-5} conns=${CONNS:-64} size=${SIZE:-1k}
scratch=$(mktemp -d)
mkdir -p /tmp/portico-nginx-pass
sed "s/^worker_processes .*/worker_processes ${NGINX_WORKERS:-auto};/" "$here/nginx.conf" > "$scratch/nginx.conf"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
taskset -c 0 "$ceiling" 127.0.0.1:8095 >/dev/null 2>&1 &
pids+=($!)
tck=$(getconf CLK_TCK)
# utime + stime, in clock ticks, of a process and its children.
cpu_of() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    [[ -r /proc/$p/stat ]] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $total
}
turn() {
  local proxy=$1 n=$2 wrap=() port pid out before after requests
  [[ -n ${CAP:-} ]] && wrap=("$here/capped.sh" "alternate-cap-$n" "$CAP")
  if [[ $proxy == nginx ]]; then
    port=8181
    taskset -c 1 "${wrap[@]}" nginx -p /tmp/portico-nginx-pass/ -c "$scratch/nginx.conf" >/dev/null 2>&1 &
  else
    port=8184
    RUST_LOG=warn taskset -c 1 "${wrap[@]}" "$proxy" run "$here/portico.policy" --log-format plain >/dev/null 2>&1 &
  fi
  pid=$!
  pids+=($pid)
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/obj/$size" && break; sleep 0.1; done
  # A warm-up, so that every connection (client and upstream) is open.
  taskset -c 0 timeout 30 wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port/obj/$size" >/dev/null
  before=$(cpu_of "$pid")
  out=$(taskset -c 0 timeout $((duration + 30)) wrk -t1 -c"$conns" -d"${duration}s" "http://127.0.0.1:$port/obj/$size")
  after=$(cpu_of "$pid")
  requests=$(awk '/requests in/ {print $1}' <<< "$out")
  awk -v name="$(basename "$proxy")" -v n="$n" -v rps="$(awk '/Requests\/sec/ {print $2}' <<< "$out")" \
    -v cpu=$((after - before)) -v tck="$tck" -v req="$requests" \
    'BEGIN { printf "turn %d %-14s %9.0f req/s %6.2f us/req\n", n, name, rps, cpu / tck * 1e6 / req }'
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}
sleep 0.5
for n in $(seq "$turns"); do
  turn "$1" "$n"
  turn "$2" "$n"
done
