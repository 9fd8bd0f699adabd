#!/usr/bin/env bash
# kubectl 1.20 (Debian's kubernetes-client package) without root, for the emulated Kubernetes
# API's tests (docs/kube-sim.md). The first run fetches the .deb with `apt-get download` (no root
# needed) and unpacks it with `dpkg -x` into ~/.cache/switchyard/kubectl-1.20; later runs reuse
# it. Without apt (or when the download fails) it falls back to the kubectl on PATH and says so
# on stderr.
#
#   scripts/kubectl.sh --which           # prints "apt <path>" or "path <path>" (what runs)
#   scripts/kubectl.sh --kubeconfig K get pods,deployments,leases
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/kubectl-1.20"
BIN="$CACHE/usr/bin/kubectl"

fetch() {
    command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 || return 1
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    (cd "$tmp" && timeout 300 apt-get download -q kubernetes-client >/dev/null 2>&1) || return 1
    mkdir -p "$CACHE.partial"
    dpkg -x "$tmp"/kubernetes-client_*.deb "$CACHE.partial" || return 1
    rm -rf "$CACHE"
    mv "$CACHE.partial" "$CACHE"
}

if [ ! -x "$BIN" ]; then
    fetch || rm -rf "$CACHE.partial"
fi

if [ -x "$BIN" ]; then
    if [ "${1:-}" = "--which" ]; then echo "apt $BIN"; exit 0; fi
    exec "$BIN" "$@"
fi

FALLBACK="$(command -v kubectl || true)"
if [ -z "$FALLBACK" ]; then
    echo "kubectl.sh: no kubectl: apt-get download kubernetes-client failed and none on PATH" >&2
    exit 127
fi
if [ "${1:-}" = "--which" ]; then echo "path $FALLBACK"; exit 0; fi
echo "kubectl.sh: kubectl 1.20 unavailable (apt-get download failed); using $FALLBACK" >&2
exec "$FALLBACK" "$@"
