"""The kubeconfig that points kubectl and the ``kubernetes`` client at the emulator.

Written as JSON, which is YAML too (kubectl and ``kubernetes.config.load_kube_config`` read it):
cluster ``kube-sim`` (plain http on loopback), user ``kube-sim`` with a dummy bearer token (the
emulator does no authentication), context ``kube-sim`` with namespace ``default``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["NAME", "kubeconfig", "write_kubeconfig"]

NAME = "kube-sim"
TOKEN = "kube-sim-dummy-token"


def kubeconfig(url: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": NAME, "cluster": {"server": url}}],
        "users": [{"name": NAME, "user": {"token": TOKEN}}],
        "contexts": [
            {"name": NAME, "context": {"cluster": NAME, "user": NAME, "namespace": namespace}}
        ],
        "current-context": NAME,
        "preferences": {},
    }


def write_kubeconfig(path: Path, url: str) -> None:
    """Write atomically (a reader never sees half a file), mode 0600 like kubectl's own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(kubeconfig(url), indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
