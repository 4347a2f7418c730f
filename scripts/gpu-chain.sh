#!/usr/bin/env bash
# Run a list of GPU steps one after another, detached from the device call that starts it, so that a
# chain longer than one call's limit survives; every step's log lands in $CHAIN_OUT (default
# /tmp/gpu-chain; CHAIN_OUT=/tmp/gpu-chain-NAME runs chains side by side) and `scripts/gpu-chain.sh collect`
# archives every chain's logs into $OUT/chains.tgz in a later call.
#   setsid nohup bash scripts/gpu-chain.sh run FILE &   FILE: one shell command per line, "# ..." ignored
#   bash scripts/gpu-chain.sh collect                    archive the logs so far to $OUT, print the progress
#                                                        (with those of $CHAIN_EXTRA folders, default /tmp/st)
#   bash scripts/gpu-chain.sh wait SECONDS && ... collect  wait inside the same call until every chain says
#                                                        "chain done" or SECONDS pass: a host can go back in the
#                                                        gap between two calls, so wait and collect in one
set -uo pipefail
cd "$(dirname "$0")/.."
CHAIN_OUT=${CHAIN_OUT:-/tmp/gpu-chain}
mkdir -p "$CHAIN_OUT"
if [ "${1:-}" = collect ]; then  # every chain's folder (/tmp/gpu-chain*) in one archive: $OUT takes 8 files
  extra=""; for d in ${CHAIN_EXTRA:-/tmp/st}; do [ -d "$d" ] && extra="$extra $(ls "$d"/*.log "$d"/*.json 2>/dev/null)"; done
  # files under 3 MiB only: the archive must stay under what a call brings back (a full one did not, 2026-12-04)
  { find /tmp/gpu-chain* -type f -size -3M; for f in $extra; do echo "$f"; done; } | tar czf "${OUT:?}/chains.tgz" -T - 2>/dev/null
  for c in /tmp/gpu-chain*; do
    echo "=== $c"; cat "$c/progress" 2>/dev/null
    for f in "$c"/step-*.log; do [ -e "$f" ] && { echo "== $f"; tail -n 4 "$f" | cut -c1-400; }; done
  done
  nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null
  exit 0
fi
if [ "${1:-}" = wait ]; then
  end=$(( $(date +%s) + ${2:?wait SECONDS} ))
  while [ "$(date +%s)" -lt "$end" ]; do
    pending=0  # a folder without progress holds no chain (this script makes $CHAIN_OUT itself)
    for c in /tmp/gpu-chain*; do [ -f "$c/progress" ] && ! grep -q "chain done" "$c/progress" && pending=1; done
    [ "$pending" = 0 ] && exit 0
    sleep 5
  done
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: gpu-chain.sh run FILE | collect | wait SECONDS"; exit 2; }
export PYTHONPATH=/tmp/miles-gpu/site PYTHONUNBUFFERED=1
i=0
while IFS= read -r cmd; do
  case "$cmd" in ''|'#'*) continue;; esac
  i=$((i + 1)); t0=$(date +%s)
  echo "$(date -u +%H:%M:%S) step $i start: $cmd" >> "$CHAIN_OUT/progress"
  bash -c "$cmd" > "$CHAIN_OUT/step-$i.log" 2>&1; rc=$?
  echo "$(date -u +%H:%M:%S) step $i rc=$rc after $(( $(date +%s) - t0 )) s" >> "$CHAIN_OUT/progress"
done < "$2"
echo "$(date -u +%H:%M:%S) chain done" >> "$CHAIN_OUT/progress"
