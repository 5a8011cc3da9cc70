#!/usr/bin/env bash
# Runs a command inside a cgroup (v1 cpu controller) that lets it use at most
# CAP percent of one core: `capped.sh NAME CAP COMMAND...`. run.sh uses it with
# CAP=... so that each proxy, not the load generator on the other core, is
# what limits the requests per second: with the same quota, the proxy that
# spends less CPU per request serves more requests. The group is made (or its
# quota reset) here, with a 10 ms period (CAP_PERIOD_US to change it) so
# that the cap is smooth at the scale of a request's latency.
set -euo pipefail
name=$1 cap=$2
shift 2
root=${CGROUP_CPU:-/sys/fs/cgroup/cpu}
group=$root/$name
[[ -w $root ]] || { echo "capped.sh: $root is not writable; run without CAP" >&2; exit 1; }
mkdir -p "$group"
period=${CAP_PERIOD_US:-10000}
echo "$period" > "$group/cpu.cfs_period_us"
echo $((period * cap / 100)) > "$group/cpu.cfs_quota_us"
echo $$ > "$group/cgroup.procs"
exec "$@"
