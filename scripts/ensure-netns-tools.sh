#!/usr/bin/env bash
# Installs iproute2 (the `ip` command) from Debian's packages when it is missing.
# The integration tests' multi-host fixture (integration-tests/src/netns.rs) runs workers in
# network namespaces it creates with `ip netns`, veth pairs and a bridge; that also needs root
# (CAP_NET_ADMIN and CAP_SYS_ADMIN), which the tests check themselves.
set -euo pipefail
if command -v ip >/dev/null 2>&1 && ip netns list >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "iproute2's \`ip\` is missing and apt-get is not available: install iproute2" >&2
  echo "(the network-namespace tests need \`ip netns\`, veth and bridge support)." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing iproute2 from Debian's packages..." >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iproute2 >/dev/null
ip -V >&2
