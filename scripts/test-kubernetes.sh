#!/usr/bin/env bash
# `make test-kubernetes`: the Kubernetes backend's tests against a real cluster (the tests
# named cluster_* in integration-tests/tests/kubernetes.rs, all of them: processes and their exit
# codes and output, terminate/kill, workers that SIGKILL themselves, a pool map whose worker pod
# is killed, an actor whose host pod is killed, pods that cannot start, pods the cluster refuses
# to create, a program that lacks the function, Jobs deleted when the runtime is dropped). The same scenarios run against the API emulator in
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
#   SHOAL_TEST_OTHER_COMMAND  another shoal program in the image, lacking the tests' functions
#                           (default /usr/local/bin/scenario, which the test image holds)
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
# Every ignored test whose name has `cluster_` (all of them start with it): the same selection as
# the test that runs them against an emulator standing in for a cluster.
exec cargo test -p shoal-integration-tests --features kubernetes --test kubernetes -- \
  --ignored --test-threads=1 --nocapture cluster_
