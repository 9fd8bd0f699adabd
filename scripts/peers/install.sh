#!/usr/bin/env bash
# Install the peer routers (sglang-router, vllm-router) into their own virtualenvs under
# ~/.cache/switchyard/peers (per docs/peer-lab): never into the project venv, never a project dependency.
# Idempotent: an existing venv with the package importable is kept.
set -euo pipefail
PEERS_HOME="${PEERS_HOME:-$HOME/.cache/switchyard/peers}"
PYTHON="${PYTHON:-python3}"
SGLANG_ROUTER_VERSION="${SGLANG_ROUTER_VERSION:-0.3.2}"
VLLM_ROUTER_VERSION="${VLLM_ROUTER_VERSION:-0.1.17}"
mkdir -p "$PEERS_HOME"

install_peer() {  # name pip-spec import-check
  local name="$1" spec="$2" check="$3" venv="$PEERS_HOME/$1"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "peer $name: present ($venv)"
    return 0
  fi
  echo "peer $name: installing $spec into $venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if "$venv/bin/python" -m pip install -q "$spec"; then
    "$venv/bin/python" -c "$check" && echo "peer $name: ok"
  else
    echo "peer $name: pip install failed" >&2
    return 1
  fi
}

rc=0
install_peer sglang-router "sglang-router==$SGLANG_ROUTER_VERSION" "import sglang_router" || rc=1
install_peer vllm-router "vllm-router==$VLLM_ROUTER_VERSION" "import vllm_router" || rc=1
exit $rc
