#!/usr/bin/env bash
# Builds the image `make test-kubernetes` runs its worker pods from: this source's Kubernetes
# test binary (integration-tests/tests/kubernetes.rs, built with the `kubernetes` feature) at
# /usr/local/bin/shoal-kubernetes-tests, and the test crate's programs (`scenario`, `service`,
# `attributed`; `cluster_a_program_without_the_function_fails_naming_it` runs its pods from
# `scenario`, a program that lacks the tests' functions), with deploy/kubernetes/Dockerfile.
# The test binary
# on this machine (the driver) and the one in the image are builds of the same source, so the
# image has every function the tests start.
#
#   scripts/build-kubernetes-test-image.sh IMAGE [--push]
#   export SHOAL_TEST_IMAGE=IMAGE
#
# For a local cluster, load the image instead of pushing it (kind load docker-image IMAGE,
# minikube image load IMAGE, k3d image import IMAGE).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 IMAGE [--push]" >&2
  exit 2
fi
image=$1
docker build -f deploy/kubernetes/Dockerfile \
  --build-arg PACKAGE=shoal-integration-tests --build-arg TEST=kubernetes \
  -t "$image" .
if [ "${2:-}" = "--push" ]; then
  docker push "$image"
fi
echo "built $image; now: export SHOAL_TEST_IMAGE=$image"
