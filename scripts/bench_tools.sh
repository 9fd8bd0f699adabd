#!/usr/bin/env bash
# Tools for `make bench-overhead` (benchmarks/overhead): wrk and nginx from apt when missing,
# matplotlib and py-spy (the project's `bench` extra) in the project venv, then the peer routers
# (scripts/peers/install.sh, their own venvs). A peer that fails to install is skipped by the
# benchmark with a message, so a failed peer install does not stop the run.
set -euo pipefail
PY="${PY:-.venv/bin/python}"

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench tools: apt-get install ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

{ "$PY" -c "import matplotlib" 2>/dev/null && [ -x "$(dirname "$PY")/py-spy" ]; } \
  || "$PY" -m pip install -q -e '.[bench]'

bash scripts/peers/install.sh || echo "bench tools: some peers did not install (skipped in the run)" >&2
