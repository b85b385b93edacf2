#!/usr/bin/env bash
# Every test of crcm: Rust (format, lint, unit + property tests) and Python (lint, pytest).
# Run from anywhere after `pip install ".[test]"`; CI runs exactly this (.ci/run).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m slow` or `-k scheduler`.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "rustfmt"
cargo fmt --all --check
step "clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test"
cargo test --workspace --locked

step "ruff"
python -m ruff check .
python -m ruff format --check .

step "pytest"
# pytest exits 5 when it collected nothing: for this suite that is a failure, say so plainly.
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: the test suite is missing or filtered away" >&2
fi
exit "$status"
