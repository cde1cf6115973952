#!/usr/bin/env bash
# Installs the baselines comsat-bench measures beside comsat, from Debian
# packages: stunnel (a two-hop TLS chain, the same topology as comsat without
# the end-to-end layer) and iperf3. A peer that is missing is reported as
# missing by the bench, never silently dropped.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (apt-get install)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v stunnel >/dev/null 2>&1 || ! command -v iperf3 >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq stunnel4 iperf3 >/dev/null
fi
stunnel -version 2>&1 | head -1 || true
iperf3 --version | head -1
