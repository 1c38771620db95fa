#!/usr/bin/env bash
# Installs what notifier needs on a fresh Debian/Ubuntu machine (idempotent):
# redis-server, promtool and amtool from apt (root, or sudo), then notifier with its test tools
# from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  # The package starts a system redis on :6379; notifier runs its own, so stop that one.
  ($SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1) || true
fi

# promtool and amtool check the deployment examples in the tests.
bash scripts/install-ops-tools.sh

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "installed: $(redis-server --version | cut -d' ' -f1-3), notifier $("$PYTHON" -c 'import notifier; print(notifier.__version__)')"
