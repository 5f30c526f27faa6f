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
for t in $(ls fuzz_targets | sed 's/\.rs$//'); do
  echo "==> fuzz $t for ${secs}s"
  ./run.sh "$t" "$secs" 2>&1 | grep -E 'Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb|ERROR|SUMMARY|panicked|deadly signal' || true
  # run.sh's status is what counts (grep above only trims the output)
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz target $t failed; see fuzz/artifacts/$t/" >&2; exit 1; }
done
