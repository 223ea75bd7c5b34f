#!/usr/bin/env bash
# Run CI's exact entry point N times, each on a fresh clone of HEAD, and report each result:
# how "make test passes 10 runs out of 10" is checked.   usage: scripts/ci_repeat.sh [N]
set -uo pipefail
runs="${1:-10}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
failed=0
for i in $(seq 1 "$runs"); do
  clone="$(mktemp -d)"
  git clone -q "$repo" "$clone"
  start=$(date +%s)
  (cd "$clone" && CI=true bash .ci/run </dev/null >"$clone.log" 2>&1)
  rc=$?
  summary="$(grep -E '[0-9]+ passed' "$clone.log" | tail -1)"
  echo "run $i/$runs: rc=$rc $(( $(date +%s) - start ))s ${summary} (log: $clone.log)"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  rm -rf "$clone"
done
echo "$((runs - failed)) of $runs runs passed"
[ "$failed" -eq 0 ]
