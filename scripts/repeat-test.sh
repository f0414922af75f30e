#!/usr/bin/env bash
# Runs one vitest file RUNS times in a row, optionally with CPU hogs beside it, and stops at the
# first failure. For flakes that need load to show, e.g. the Worker teardown race:
#   bash scripts/repeat-test.sh 50 test/native/worker.test.ts --hogs 2
set -euo pipefail
runs=${1:?usage: repeat-test.sh RUNS FILE [--hogs N]}
file=${2:?usage: repeat-test.sh RUNS FILE [--hogs N]}
hogs=0
[[ "${3:-}" == --hogs ]] && hogs=${4:-2}
cd "$(dirname "$0")/.."
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
for ((h = 0; h < hogs; h++)); do (while :; do :; done) & pids+=($!); done
log=$(mktemp)
for ((i = 1; i <= runs; i++)); do
  if ! npx vitest run "$file" >"$log" 2>&1; then
    echo "run $i of $runs failed:"; tail -40 "$log"; rm -f "$log"; exit 1
  fi
  printf 'run %d of %d passed\n' "$i" "$runs"
done
rm -f "$log"
echo "$runs passed, 0 failed"
