#!/usr/bin/env bash
# Installs what pgwarden needs on a fresh Debian machine: PostgreSQL and pgbouncer
# (Debian packages), the Python dependencies, and the Rust extension (release build).
# Safe to run repeatedly; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

need_apt=()
pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}
pg_bindir >/dev/null || need_apt+=(postgresql postgresql-contrib)
command -v psql >/dev/null || need_apt+=(postgresql-client)
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || need_apt+=(pgbouncer)
# libpg_query's Rust binding is generated at build time by bindgen: libclang and the
# compiler's own headers.
has_libclang() {
  ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9]+)?\.so' &&
    compgen -G '/usr/lib/llvm-*/lib/clang/*/include/stddef.h' >/dev/null
}
has_libclang || need_apt+=(libclang-dev)
if [ "${#need_apt[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The Debian package starts a cluster of its own; pgwarden never uses it.
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
      $SUDO pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
  fi
  $SUDO systemctl stop pgbouncer 2>/dev/null || $SUDO service pgbouncer stop 2>/dev/null || true
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import maturin' 2>/dev/null && ! command -v maturin >/dev/null; then
  log "installing maturin"
  "$PY" -m pip install -q "maturin>=1.5,<2"
fi
log "building the extension and installing Python dependencies"
"$PY" -m pip install -q --no-build-isolation -e ".[test,bench]"
"$PY" -c 'import pgwarden._wire' || { log "extension failed to import"; exit 1; }
log "ready"
