#!/usr/bin/env bash
# Installs the operations tools the deploy-artefact tests run (idempotent):
# promtool (Debian package `prometheus`), amtool (`prometheus-alertmanager`) and
# systemd-analyze (`systemd`, usually present already).
# Only the command-line tools are wanted: the packages' own daemons are stopped and disabled,
# so no system Prometheus (:9090) or Alertmanager (:9093, :9094) is left running.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PACKAGES=()
command -v promtool >/dev/null 2>&1 || PACKAGES+=(prometheus)
command -v amtool >/dev/null 2>&1 || PACKAGES+=(prometheus-alertmanager)
command -v systemd-analyze >/dev/null 2>&1 || PACKAGES+=(systemd)

if [ "${#PACKAGES[@]}" -gt 0 ]; then
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    $SUDO apt-get update -qq
  fi
  # A policy-rc.d answering 101 keeps invoke-rc.d from starting the daemons during install
  # (on machines without one; an existing policy is left alone and kept).
  POLICY=/usr/sbin/policy-rc.d
  ADDED_POLICY=""
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    ADDED_POLICY=1
  fi
  trap '[ -n "$ADDED_POLICY" ] && $SUDO rm -f "$POLICY"' EXIT
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
fi

# Whatever started them (a policy-less install, an earlier run): stop and disable the daemons.
for unit in prometheus prometheus-alertmanager; do
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
  else
    $SUDO service "$unit" stop >/dev/null 2>&1 || true
    command -v update-rc.d >/dev/null 2>&1 && $SUDO update-rc.d "$unit" disable >/dev/null 2>&1 || true
  fi
done

echo "installed: $(promtool --version 2>&1 | head -1); $(amtool --version 2>&1 | head -1);" \
  "$(systemd-analyze --version 2>&1 | head -1)"
