#!/usr/bin/env bash
# Installs the baselines comsat-bench measures beside comsat: stunnel (a
# two-hop TLS chain, the same topology as comsat without the end-to-end
# layer) and iperf3 (the loopback TCP ceiling) from Debian packages, and
# rathole (TCP and Noise transports, one hop) from crates.io. A peer that
# is missing is reported as missing by the bench, never silently dropped.
set -euo pipefail
if ! command -v stunnel >/dev/null 2>&1 || ! command -v iperf3 >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "stunnel or iperf3 is missing: run as root (apt-get install)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq stunnel4 iperf3 >/dev/null
fi
if ! command -v rathole >/dev/null 2>&1; then
  # rathole's lock file no longer builds on current Rust: no --locked.
  cargo install --quiet rathole@0.5.0
fi
stunnel -version 2>&1 | head -1 || true
iperf3 --version | head -1
rathole --version | grep "Build Version"
