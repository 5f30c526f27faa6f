#!/usr/bin/env bash
# Run one fuzz target: fuzz/run.sh <key_extract|config_yaml|cell_json> [seconds, default 600]
# Needs a nightly toolchain (rustup toolchain install nightly) and cargo-fuzz
# (cargo install cargo-fuzz). Seeds are fuzz/seeds/<target> (committed, small); what the
# fuzzer learns goes to fuzz/corpus/<target> (ignored by git); a crash is saved under
# fuzz/artifacts/<target>/ and makes this script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh <target> [seconds]   targets: $(ls fuzz_targets | sed 's/\.rs$//' | tr '\n' ' ')}
secs=${2:-600}
[ -f "fuzz_targets/$target.rs" ] || { echo "no fuzz target $target" >&2; exit 2; }
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz/run.sh: needs a nightly toolchain (rustup toolchain install nightly)" >&2; exit 3
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >&2
fi
mkdir -p "corpus/$target"
# -rss_limit_mb keeps a pathological input from eating the machine; -timeout flags hangs.
exec cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
