#!/usr/bin/env bash
# Install a real Prometheus server (Debian package) for tests/metrics/test_prometheus_real.py.
# Idempotent: does nothing when /usr/bin/prometheus already exists.
# Never starts the system service: a temporary /usr/sbin/policy-rc.d (exit 101) forbids
# invoke-rc.d / deb-systemd-invoke from starting it during the install; the tests run their own
# Prometheus on 127.0.0.1 with a temp config and storage dir.
set -euo pipefail

if [ -x /usr/bin/prometheus ]; then
    echo "install-prometheus: /usr/bin/prometheus already present ($(/usr/bin/prometheus --version 2>&1 | head -n1))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# added by tools/install-prometheus.sh: do not start services\nexit 101\n' \
        | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    ADDED_POLICY=1
fi
cleanup() { if [ "$ADDED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus

# Belt and braces: if an init system started it anyway, stop it (ignore failures).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl stop prometheus >/dev/null 2>&1 || true
    $SUDO systemctl disable prometheus >/dev/null 2>&1 || true
fi

/usr/bin/prometheus --version 2>&1 | head -n1
