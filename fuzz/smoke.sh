#!/usr/bin/env bash
# A short run of every fuzz target (default 30 s each): fuzz/smoke.sh [seconds]
# Exits 0 with a message when no nightly toolchain is available (fuzzing needs one).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz smoke skipped: no nightly toolchain (rustup toolchain install nightly)"
  exit 0
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for t in $(ls fuzz_targets | sed 's/\.rs$//'); do
  echo "==> fuzz $t for ${secs}s"
  # run.sh's status is what counts; the grep only trims its output.
  st=0
  ./run.sh "$t" "$secs" >"$out" 2>&1 || st=$?
  grep -E 'Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb|ERROR|SUMMARY|panicked|deadly signal' "$out" || true
  if [ "$st" -ne 0 ]; then
    tail -n 40 "$out" >&2
    echo "fuzz target $t failed (exit $st); see fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
