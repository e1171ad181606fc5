#!/usr/bin/env bash
# `make test-kubernetes`: the Kubernetes backend's tests against a real cluster (the tests
# named cluster_* in integration-tests/tests/kubernetes.rs: processes and their exit codes and
# output, terminate/kill, a pool map whose worker pod is killed, pods that cannot start, Jobs
# deleted when the runtime is dropped). The same scenarios run against the API emulator in
# `make test`; this target is not part of it.
#
# Needs:
#   KUBECONFIG              a kubeconfig whose current context may create, watch and delete Jobs
#                           and pods (deploy/kubernetes/rbac.yaml lists the verbs) and Secrets
#                           in the namespace
#   SHOAL_TEST_IMAGE        an image holding this source's Kubernetes test binary at
#                           /usr/local/bin/shoal-kubernetes-tests, pullable by the cluster:
#                           scripts/build-kubernetes-test-image.sh IMAGE [--push]
#   SHOAL_TEST_REDIS_URL    a Redis this machine reaches (redis:// or rediss://)
# Optional:
#   SHOAL_TEST_WORKER_REDIS_URL  the same Redis as the pods reach it, when they reach it by
#                           another address (e.g. redis://shoal-redis:6379 while this machine
#                           uses `kubectl port-forward svc/shoal-redis 6379:6379` and
#                           redis://127.0.0.1:6379); the tests pass it through a Secret
#   SHOAL_TEST_NAMESPACE    the Jobs' namespace (default: the kubeconfig context's)
#   SHOAL_TEST_COMMAND      the test binary's path in the image
# Without the three required variables it prints why it skips and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for variable in KUBECONFIG SHOAL_TEST_IMAGE SHOAL_TEST_REDIS_URL; do
  if [ -z "${!variable:-}" ]; then missing+=("$variable"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-kubernetes: SKIPPED, no real-cluster test ran: ${missing[*]} not set."
  echo "  Set KUBECONFIG, SHOAL_TEST_IMAGE (scripts/build-kubernetes-test-image.sh) and"
  echo "  SHOAL_TEST_REDIS_URL; see scripts/test-kubernetes.sh and README \"Run on Kubernetes\"."
  echo "  (The emulator runs the same scenarios in \`make test\`.)"
  exit 0
fi
echo "test-kubernetes: cluster of $KUBECONFIG, image $SHOAL_TEST_IMAGE"
# libtest, not nextest: a real cluster may take longer than nextest's per-test limit (each test
# allows itself 20 minutes; pulls and scheduling are the cluster's).
exec cargo test -p shoal-integration-tests --features kubernetes --test kubernetes -- \
  --ignored --exact --test-threads=1 --nocapture \
  cluster_processes_exit_with_pythons_codes \
  cluster_terminate_and_kill \
  cluster_pool_map_survives_a_killed_worker_pod \
  cluster_pods_that_cannot_start_are_reported \
  cluster_dropping_the_runtime_deletes_its_jobs
