#!/usr/bin/env bash
# The soak (benches/src/bin/soak.rs): a release build of the gateway and the soak driver,
# then mixed traffic with periodic reloads and faults for SOAK_SECS (default 1800 = 30 min).
#   benches/soak/run.sh                  # 30 minutes
#   SOAK_SECS=120 benches/soak/run.sh    # a short run
# Prints RSS and fd counts at start, after warm-up and at the end; exits 1 when the end is
# more than 10 % above the after-warm-up figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p cellgate -p cellgate-benches --bin cellgate --bin soak
exec target/release/soak
