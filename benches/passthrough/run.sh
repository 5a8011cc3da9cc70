#!/usr/bin/env bash
# Pass-through (cache off) comparison of Portico and NGINX proxy_pass, with
# the shared bench harness. The upstream is the harness's bare hyper server
# (the "ceiling" binary) on 127.0.0.1:8095, pinned beside the load generator,
# so that the proxies, not a slow origin, are what is measured.
#
# Run from the project root after `cargo build --release`:
#     benches/passthrough/run.sh            (REPS, DURATION, SIZES as in the harness)
#     CAP=50 benches/passthrough/run.sh     each proxy held to 50% of one core
#
# Uncapped, the two proxies each cost about as much CPU per request as wrk
# and the upstream together on the other core, so a round is decided by
# whichever core the machine slows at that moment. With CAP (a percentage of
# one core, given to each proxy in its own cgroup by capped.sh) the proxy is
# always the bottleneck, and the ratio is one of CPU cost per request.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bench=${BENCH_SH:-$root/../shared/bench/bench.sh}
bench_dir=${BENCH_DIR:-${TMPDIR:-/tmp}/portico-bench}
ceiling=$bench_dir/ceiling-target/release/ceiling
portico=${PORTICO_BIN:-$root/target/release/portico}
if [[ ! -x $ceiling ]]; then
  (cd "$(dirname "$bench")/ceiling" && CARGO_TARGET_DIR=$bench_dir/ceiling-target cargo build --release -q)
fi
# nginx.conf has `access_log off`; Portico's access log is turned off the
# same way so that both do the same work per request.
export RUST_LOG=${RUST_LOG:-info,portico::access=off}
# The upstream shares CPU 0 with wrk and takes 35% to 45% of it, so the
# harness's foreign-load check (25% by default) would re-run every
# repetition; anything else running would still push it past 60%.
export BG_MAX=${BG_MAX:-60}
mkdir -p /tmp/portico-nginx-pass
taskset -c "${LOADGEN_CPU:-0}" "$ceiling" 127.0.0.1:8095 > /tmp/portico-pass-upstream.log 2>&1 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
sleep 0.5
wrap_portico= wrap_nginx=
if [[ -n ${CAP:-} ]]; then
  wrap_portico="$here/capped.sh portico-pass-cap $CAP"
  wrap_nginx="$here/capped.sh nginx-pass-cap $CAP"
fi
REF=${REF:-nginx-pass} TESTS=hit "$bench" \
  "portico-pass=http://127.0.0.1:8184::$wrap_portico $portico run $here/portico.policy --log-format plain" \
  "nginx-pass=http://127.0.0.1:8181::$wrap_nginx nginx -p /tmp/portico-nginx-pass/ -c $here/nginx.conf"
