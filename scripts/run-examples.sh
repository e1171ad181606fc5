#!/usr/bin/env bash
# Runs every example as a user would and checks what it prints. Each example also exits
# non-zero when its own check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same features as the test build (`--workspace --all-features`), so the examples link the
# libraries that build made instead of compiling a second set.
cargo build -q --workspace --all-features --examples
dir=target/debug/examples
fail=0
check() { # check NAME EXPECTED-SUBSTRING [ARGS...]
  local name=$1 expected=$2 out
  shift 2
  if ! out=$(timeout 120 "$dir/$name" "$@" 2>&1); then
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
check queue "consumed 6 items"
check simple_queue "empty: true"
check joinable_queue "all tasks done"
check pipe "Worker 1 received: Worker 2 multiplied value by 5 and got 50"
check lock "Process 4: Accessing shared resource"
check semaphore "at most 2 workers were inside at once"
check event "Worker 2 received the event!"
check condition "Worker 2 received the condition"
check barrier "Worker 2 passed the barrier"
# The seed's counts are 10000 x 10; a debug build runs 1000 x 3 here.
check counter "Final balance = 100" 1000 3
check array "Final Array: [3, 4, 5, 6, 7]"
check actor_counter "every increment applied exactly once"
check manager 'dict2: {"key1": 22, "key2": 23}'
check service "self-test: 200/200 requests ok" --self-test
exit $fail
