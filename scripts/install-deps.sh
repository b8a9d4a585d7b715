#!/usr/bin/env bash
# Install what the tests and the run script need, where it is missing:
# redis-server, redis-tools, openssl, promtool and chromium (Debian), the Node packages of the
# compatibility suite (npm ci) and redis-py (a venv). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
# The TLS tests generate their certificates with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "${WITH_BENCH_DEPS:-0}" = 1 ]; then
  command -v nutcracker >/dev/null 2>&1 || missing+=(nutcracker)
fi
if [ "${SKIP_COMPAT_DEPS:-0}" != 1 ]; then
  # The test suite checks deploy/alerts.yml with promtool (Debian's
  # prometheus package; its service is not needed and not started here).
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  # The status page is tested in a headless browser.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)"
  apt_install "${missing[@]}"
fi
# Debian's package may start a system redis-server on 6379; tests never use it.

if [ "${SKIP_COMPAT_DEPS:-0}" != 1 ]; then
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "installing nodejs and npm (Debian packages)"
    apt_install nodejs npm
  fi
  if [ ! -d compat/node/node_modules/ioredis ] || [ compat/node/package-lock.json -nt compat/node/node_modules ]; then
    (cd compat/node && npm ci --no-audit --no-fund --loglevel=error)
  fi
  if [ ! -x compat/python/.venv/bin/python ] || ! compat/python/.venv/bin/python -c 'import redis' 2>/dev/null; then
    python3 -m venv compat/python/.venv
    compat/python/.venv/bin/pip install -q -r compat/python/requirements.txt
  fi
fi
