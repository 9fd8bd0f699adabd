#!/usr/bin/env bash
# Installs the services the test suite starts itself (a real redis-server per test, a real
# prometheus and promtool for tests/observability) when they are missing; Debian packages, as
# root (CI and the developers' machines) or via sudo.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)  # Cluster creation in tests
# Debian's prometheus (2.42) ships both binaries; promtool checks and unit-tests the alert rules.
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing ${need[*]} (apt)"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
