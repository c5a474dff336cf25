#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 20).
# Uses the nightly toolchain when installed, else stable with RUSTC_BOOTSTRAP=1.
set -euo pipefail
seconds="${1:-20}"
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 1
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

for target in $("${fuzz[@]}" list); do
    echo "== $target (${seconds}s)"
    "${fuzz[@]}" run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
