#!/usr/bin/env bash
# The whole pgwarden test suite: installs what it needs, then runs the Rust checks
# (fmt, clippy, unit + property tests, a short fuzz run), the Python checks (ruff,
# mypy --strict, stub test) and the integration tests against a real PostgreSQL
# that the suite starts itself.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS="${PGWARDEN_FUZZ_SECONDS:-15}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

step "bootstrap"
./scripts/bootstrap.sh

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test (codec unit and property tests, span assembly)"
cargo test -p pgwarden-wire -p pgwarden-ship

step "fuzz: ${FUZZ_SECONDS}s per target"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install -q cargo-fuzz
fi
rust/wire/fuzz/run-all.sh "$FUZZ_SECONDS"

step "ruff"
ruff check python tests benches
ruff format --check python tests benches
step "mypy --strict"
mypy
step "stubtest: the hand-written _wire.pyi matches the extension"
python3 -m mypy.stubtest pgwarden._wire --allowlist python/stubtest-allowlist.txt

step "docs/configuration.md and the example config match the settings model"
python3 docs/gen_config_doc.py --check

step "pytest (integration against a real PostgreSQL)"
python3 -m pytest "$@"

if [ "${PGWARDEN_SKIP_BENCH_SMOKE:-0}" != 1 ]; then
  # Proves the benchmark harness runs end to end; it never fails on a timing.
  step "benchmark harness smoke run (direct vs pgbouncer vs pgwarden, with and without audit)"
  python3 benches/gateway_bench.py --quick --audit --out bench-results/ci-quick.json
  step "export cost smoke run (the OTLP/HTTP and OTLP/gRPC exporters against the benchmark sink)"
  python3 benches/export_cost.py --spans 64 --requests 3
  step "idle memory smoke run (memory per idle session: direct vs pgbouncer vs pgwarden)"
  python3 benches/idle_memory.py --sessions 50 --no-tls
fi
