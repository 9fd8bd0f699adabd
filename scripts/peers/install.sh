#!/usr/bin/env bash
# Install the peer routers (sglang-router, vllm-router, LiteLLM proxy) into their own virtualenvs under
# ~/.cache/switchyard/peers (per docs/peer-lab): never into the project venv, never a project dependency.
# Idempotent: an existing venv with the package importable is kept.
set -euo pipefail
PEERS_HOME="${PEERS_HOME:-$HOME/.cache/switchyard/peers}"
PYTHON="${PYTHON:-python3}"
SGLANG_ROUTER_VERSION="${SGLANG_ROUTER_VERSION:-0.3.2}"
VLLM_ROUTER_VERSION="${VLLM_ROUTER_VERSION:-0.1.17}"
# 1.110.2 does not resolve (litellm-proxy==1.110.2 missing, peer-lab §1); 1.108.7 is what pip
# settles on. Never 1.107.0 (a compromised release).
LITELLM_VERSION="${LITELLM_VERSION:-1.108.7}"
mkdir -p "$PEERS_HOME"
# The import checks run offline: LiteLLM fetches its model cost map from GitHub on import otherwise.
export LITELLM_LOCAL_MODEL_COST_MAP=True HF_ENDPOINT=http://127.0.0.1:9 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_COLOR=1

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
if [ "${SKIP_LITELLM:-0}" != "1" ]; then  # ~750 MB
  install_peer litellm "litellm[proxy]==$LITELLM_VERSION" "import litellm.proxy.proxy_server" || rc=1
fi
exit $rc
