#!/bin/sh
# Install a Prometheus server for tests/test_prometheus.py (Debian's `prometheus` package).
# Idempotent: does nothing when `prometheus` is already on PATH. Needs root (CI runs as root);
# without root it says how and exits 0, and the test then skips (or fails when CI=true).
set -eu
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "prometheus is not installed; as root on Debian/Ubuntu: apt-get install -y prometheus" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# --no-install-recommends: the server binary only (no node exporter, no web assets we do not use).
apt-get install -y -q --no-install-recommends prometheus
# Where an init system runs, the package starts a service on :9090; the tests start their own.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
