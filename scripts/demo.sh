#!/usr/bin/env bash
# The embedded default: a throwaway PostgreSQL with sample data and pgwarden in front of it.
# Prints a psql command to paste; Ctrl-C stops and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec python3 -m pgwarden demo "$@"
