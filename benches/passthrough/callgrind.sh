#!/usr/bin/env bash
# Instructions per pass-through request, counted by callgrind: repeatable
# whatever else the machine is doing, unlike requests per second. Portico
# runs under valgrind with one worker thread and collection off; after 300
# keep-alive requests of warm-up, collection is switched on for N requests
# (h2load, HTTP/1.1, one connection) and the total is divided by N.
#
# Run from the project root after `cargo build --release` (and once
# benches/passthrough/run.sh, which builds the upstream):
#     benches/passthrough/callgrind.sh [PATH]      (default /obj/1k; N=2000)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bench_dir=${BENCH_DIR:-${TMPDIR:-/tmp}/portico-bench}
ceiling=$bench_dir/ceiling-target/release/ceiling
portico=${PORTICO_BIN:-$root/target/release/portico}
path=${1:-/obj/1k}
n=${N:-2000}
for tool in valgrind callgrind_control h2load curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[[ -x $ceiling ]] || { echo "build the upstream first: benches/passthrough/run.sh" >&2; exit 1; }
out=${CALLGRIND_OUT:-$(mktemp)}
"$ceiling" 127.0.0.1:8095 >/dev/null 2>&1 &
upstream=$!
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
  "$portico" run "$here/portico.policy" --threads 1 --log-format plain >/dev/null 2>&1 &
proxy=$!
trap 'kill $proxy $upstream 2>/dev/null || true; [[ -n ${CALLGRIND_OUT:-} ]] || rm -f "$out"' EXIT
for _ in $(seq 150); do
  curl -s -o /dev/null "http://127.0.0.1:8184$path" && break
  sleep 0.2
done
h2load --h1 -n 300 -c 1 "http://127.0.0.1:8184$path" >/dev/null
callgrind_control -i on $proxy >/dev/null
h2load --h1 -n "$n" -c 1 "http://127.0.0.1:8184$path" | grep -E '^requests:'
callgrind_control -i off $proxy >/dev/null
kill -INT $proxy
wait $proxy || true
total=$(grep -E '^totals:' "$out" | awk '{print $2}')
echo "$path: $((total / n)) instructions per request ($total over $n)"
