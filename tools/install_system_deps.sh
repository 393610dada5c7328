#!/usr/bin/env bash
# System packages the test suite needs, from Debian: promtool and a Prometheus server (package
# `prometheus`), systemd-analyze (package `systemd`) and etcd (package `etcd-server`, for the
# membership tests, which start their own throwaway etcd on free ports). Idempotent; does nothing
# when present.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 ' || need+=(libibverbs1)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
  exit 0
fi
apt-get update -qq
# policy-rc.d 101: the package must not try to start its own service here; tests start their own.
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
[ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
# etcd-server enables etcd.service (client port 2379): tests never use it, and a test host should
# not run an etcd nobody asked for.
if [[ " ${need[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
exit 0
