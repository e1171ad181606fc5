#!/usr/bin/env bash
# Installs redis-server (and redis-tools) from Debian's packages when it is missing.
# shoal's local backend starts its own redis-server; tests start private ones too.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "redis-server is missing and apt-get is not available: install Redis 6.2 or newer," >&2
  echo "or set redis.url (SHOAL_REDIS_URL) to a Redis you run." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing redis-server from Debian's packages..." >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
redis-server --version >&2
