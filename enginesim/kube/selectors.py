"""Label and field selectors (pure): parse once, match many.

Label selectors follow the apiserver's grammar: comma-separated requirements, each one of
``k=v`` / ``k==v`` / ``k!=v`` (a missing label matches ``!=``), ``k in (a,b)``,
``k notin (a,b)`` (a missing label matches), ``k`` (exists), ``!k`` (does not exist). Field
selectors support ``=``/``==``/``!=`` on dotted paths of the object (``metadata.name``,
``status.phase``, ...).

>>> sel = parse_label_selector("app=engine,tier in (a, b),!canary")
>>> sel.matches({"app": "engine", "tier": "b"})
True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FieldSelector",
    "LabelSelector",
    "Requirement",
    "SelectorError",
    "format_selector",
    "parse_field_selector",
    "parse_label_selector",
    "selector_from_match",
]

Op = Literal["=", "!=", "in", "notin", "exists", "!"]
MAX_SELECTOR_LEN = 4096

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_KEY_RE = re.compile(rf"^{_KEY}$")
_VALUE_RE = re.compile(rf"^{_VALUE}$")
_SET_RE = re.compile(rf"^({_KEY})\s+(in|notin)\s*\((.*)\)$")
_EQ_RE = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*(.*)$")


class SelectorError(ValueError):
    """An unparsable selector (the API answers 400 BadRequest)."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        has = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return has and value in self.values
        if self.op == "!=":
            return not has or value not in self.values
        if self.op == "in":
            return has and value in self.values
        if self.op == "notin":
            return not has or value not in self.values
        if self.op == "exists":
            return has
        return not has


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """All requirements must hold; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        got = labels or {}
        return all(r.matches(got) for r in self.requirements)


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unbalanced parenthesis in {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SelectorError(f"unbalanced parenthesis in {text!r}")
    parts.append(text[start:])
    return parts


def _value(v: str, text: str) -> str:
    v = v.strip()
    if not _VALUE_RE.match(v):
        raise SelectorError(f"invalid label value {v!r} in {text!r}")
    return v


def _requirement(part: str) -> Requirement:
    if m := _SET_RE.match(part):
        values = [_value(v, part) for v in m.group(4).split(",")]
        op: Op = "in" if m.group(3) == "in" else "notin"
        return Requirement(m.group(1), op, frozenset(values))
    if m := _EQ_RE.match(part):
        op = "!=" if m.group(3) == "!=" else "="
        return Requirement(m.group(1), op, frozenset({_value(m.group(4), part)}))
    if part.startswith("!") and _KEY_RE.match(part[1:].strip()):
        return Requirement(part[1:].strip(), "!")
    if _KEY_RE.match(part):
        return Requirement(part, "exists")
    raise SelectorError(f"unable to parse requirement {part!r}")


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse a ``labelSelector`` query value (None or blank: match everything)."""
    if text is None or not text.strip():
        return LabelSelector()
    if len(text) > MAX_SELECTOR_LEN:
        raise SelectorError("selector too long")
    parts = [p.strip() for p in _split_top(text)]
    if any(not p for p in parts):
        raise SelectorError(f"empty requirement in {text!r}")
    return LabelSelector(tuple(_requirement(p) for p in parts))


def selector_from_match(selector: Mapping[str, Any] | None) -> LabelSelector:
    """A Deployment's ``spec.selector`` (matchLabels and matchExpressions) as a selector."""
    if not selector:
        return LabelSelector()
    reqs = [Requirement(str(k), "=", frozenset({str(v)}))
            for k, v in sorted((selector.get("matchLabels") or {}).items())]  # fmt: skip
    ops: dict[str, Op] = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or []:
        op = ops.get(str(expr.get("operator")))
        if op is None:
            raise SelectorError(f"unknown matchExpressions operator {expr.get('operator')!r}")
        values = frozenset(str(v) for v in expr.get("values") or [])
        reqs.append(Requirement(str(expr.get("key")), op, values))
    return LabelSelector(tuple(reqs))


def format_selector(sel: LabelSelector) -> str:
    """The string form (``status.selector`` of a Scale)."""
    out = []
    for r in sel.requirements:
        values = ",".join(sorted(r.values))
        if r.op in ("=", "!="):
            out.append(f"{r.key}{r.op}{values}")
        elif r.op in ("in", "notin"):
            out.append(f"{r.key} {r.op} ({values})")
        elif r.op == "exists":
            out.append(r.key)
        else:
            out.append(f"!{r.key}")
    return ",".join(out)


@dataclass(frozen=True, slots=True)
class FieldSelector:
    """``path=value`` / ``path!=value`` requirements on dotted object paths."""

    requirements: tuple[tuple[str, bool, str], ...] = ()  # (path, equal, value)

    def matches(self, obj: Mapping[str, Any]) -> bool:
        for path, equal, value in self.requirements:
            got: Any = obj
            for part in path.split("."):
                got = got.get(part) if isinstance(got, Mapping) else None
            actual = "" if got is None else str(got)
            if (actual == value) != equal:
                return False
        return True


def parse_field_selector(text: str | None) -> FieldSelector:
    if text is None or not text.strip():
        return FieldSelector()
    if len(text) > MAX_SELECTOR_LEN:
        raise SelectorError("selector too long")
    reqs = []
    for part in text.split(","):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if m is None:
            raise SelectorError(f"invalid field selector {part!r}")
        reqs.append((m.group(1), m.group(2) != "!=", m.group(3)))
    return FieldSelector(tuple(reqs))
