#!/usr/bin/env bash
# Runs every example as a user would and checks what it prints. Each example also exits
# non-zero when its own check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p shoal-examples --examples
dir=target/debug/examples
fail=0
check() { # check NAME EXPECTED-SUBSTRING
  local name=$1 expected=$2 out
  if ! out=$(timeout 120 "$dir/$name" 2>&1); then
    echo "example $name failed:"; echo "$out" | tail -20; fail=1; return
  fi
  if ! grep -qF -- "$expected" <<<"$out"; then
    echo "example $name did not print '$expected':"; echo "$out" | tail -20; fail=1; return
  fi
  echo "example $name: ok"
}
check process "hello bob"
check pool "[2, 4, 6, 8]"
check pi_estimation "pi ~ 3.14"
check fault_tolerant_map "each present exactly once, in order"
exit $fail
