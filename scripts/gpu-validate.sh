#!/usr/bin/env bash
# Run scripts/gpu-host.sh steps detached on the GPU host, in concurrent tracks, so that a session's
# validation outlives the 10-minute limit of one device call (the host keeps /tmp while warm).
#   scripts/gpu-validate.sh start TRACK...   each TRACK is steps joined by commas, run in order;
#                                            tracks run side by side; a step `wait-tN` waits for
#                                            track N to finish (for timings that must run alone)
#   scripts/gpu-validate.sh wait SECONDS     wait until every track is done (or SECONDS pass); progress
#   scripts/gpu-validate.sh collect          every log and report as $OUT/validate.tgz, plus progress
set -uo pipefail
cd "$(dirname "$0")/.."
R=/tmp/miles-validate
case "${1:-}" in
  start)
    shift; mkdir -p "$R"; i=0
    for track in "$@"; do
      i=$((i + 1)); d="$R/t$i"; mkdir -p "$d"
      setsid bash -c '
        d=$1; R=$2; shift 2
        for s in $(echo "$1" | tr "," " "); do
          echo "$(date +%T) start $s" >> "$d/progress"
          case "$s" in
            wait-t*) while ! grep -q "^DONE" "$R/${s#wait-}/progress" 2>/dev/null; do sleep 5; done; rc=0 ;;
            *) OUT=$d MILES_STEP_TIMEOUT=${MILES_STEP_TIMEOUT:-1500} bash scripts/gpu-host.sh "$s" > "$d/$s.stdout" 2>&1; rc=$? ;;
          esac
          echo "$(date +%T) end $s rc=$rc" >> "$d/progress"
        done
        echo "DONE $(date +%T)" >> "$d/progress"' _ "$d" "$R" "$track" < /dev/null > "$d/driver.log" 2>&1 &
      echo "track t$i: $track"
    done ;;
  wait)
    end=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $end ]; do
      n=0; done_n=0
      for p in "$R"/t*/progress; do n=$((n + 1)); grep -q "^DONE" "$p" && done_n=$((done_n + 1)); done
      [ "$n" -gt 0 ] && [ "$done_n" = "$n" ] && break
      sleep 10
    done
    for p in "$R"/t*/progress; do echo "== $p"; cat "$p"; done
    nvidia-smi --query-gpu=memory.used --format=csv,noheader ;;
  collect)
    for p in "$R"/t*/progress; do echo "== $p"; cat "$p"; done
    tar czf "${OUT:?}/validate.tgz" -C "$R" . && ls -la "$OUT" ;;
  *) echo "usage: gpu-validate.sh start TRACK... | wait SECONDS | collect"; exit 2 ;;
esac
