"""PATCH bodies as the apiserver applies them (pure).

- ``application/merge-patch+json``: RFC 7386 (objects merge recursively, ``null`` deletes,
  anything else replaces).
- ``application/strategic-merge-patch+json``: applied as a merge patch. The real apiserver
  merges some lists by key (containers by name, ...); the emulated resources are patched on
  scalars and maps (replicas, labels, annotations, lease fields), where the two agree.
- ``application/json-patch+json``: RFC 6902 (add, remove, replace, move, copy, test).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PatchError", "apply_patch", "json_patch", "merge_patch", "PATCH_TYPES"]

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)
MAX_OPS = 1000


class PatchError(ValueError):
    """A patch that cannot apply (the API answers 422/400)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386; returns a new document, ``target`` is not modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _index(container: list[Any], token: str, *, adding: bool) -> int:
    if adding and token == "-":
        return len(container)
    if not token.isdigit():
        raise PatchError(f"invalid array index {token!r}")
    idx = int(token)
    if idx > len(container) or (not adding and idx == len(container)):
        raise PatchError(f"array index {idx} out of range")
    return idx


def _parent(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, adding=False)]
        else:
            raise PatchError(f"path component {token!r} not found")
    return node


def _slot(doc: Any, tokens: list[str], pointer: str, *, adding: bool) -> tuple[Any, Any]:
    """The container ``pointer`` (non-empty ``tokens``) points into and the key or index in
    it; without ``adding`` the target must exist."""
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        if not adding and last not in parent:
            raise PatchError(f"path {pointer!r} not found")
        return parent, last
    if isinstance(parent, list):
        return parent, _index(parent, last, adding=adding)
    raise PatchError(f"cannot add at {pointer!r}" if adding else f"path {pointer!r} not found")


def _get(doc: Any, pointer: str) -> Any:
    tokens = _tokens(pointer)
    if not tokens:
        return doc
    parent, key = _slot(doc, tokens, pointer, adding=False)
    return parent[key]


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = _tokens(pointer)
    if not tokens:
        return value
    parent, key = _slot(doc, tokens, pointer, adding=True)
    if isinstance(parent, list):
        parent.insert(key, value)
    else:
        parent[key] = value
    return doc


def _remove(doc: Any, pointer: str) -> Any:
    tokens = _tokens(pointer)
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent, key = _slot(doc, tokens, pointer, adding=False)
    del parent[key]
    return doc


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902; returns a new document, ``target`` is not modified."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch is a list of operations")
    if len(ops) > MAX_OPS:
        raise PatchError("too many patch operations")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid patch operation {op!r}")
        kind, path = op["op"], str(op["path"])
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc = _add(_remove(doc, path), path, copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            source = str(op.get("from", ""))
            value = copy.deepcopy(_get(doc, source))
            if kind == "move":
                doc = _remove(doc, source)
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"test operation failed at {path!r}")
        else:
            raise PatchError(f"unknown patch operation {kind!r}")
    return doc


def apply_patch(target: Any, patch: Any, content_type: str) -> Any:
    """Apply ``patch`` of media type ``content_type`` (parameters ignored)."""
    media = content_type.split(";")[0].strip().lower()
    if media == JSON_PATCH:
        return json_patch(target, patch)
    if media in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
        if not isinstance(patch, dict):
            raise PatchError("a merge patch is a JSON object")
        return merge_patch(target, patch)
    raise PatchError(f"unsupported patch type {content_type!r}")
