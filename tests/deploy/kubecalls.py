"""The Kubernetes API calls the code makes, read from its source, as RBAC (group, resource, verb).

tests/deploy/test_rbac.py compares what this finds with the Role in deploy/base/rbac.yaml, so
the Role is exactly what the code needs: a new call the Role does not grant fails the test,
and so does a grant no call uses.

Two kinds of call site are recognised in every module given (the AST, nothing is run):

- the official client's typed methods (``core.list_namespaced_pod(ns, watch=True)``): any
  call whose method name is a method of a ``kubernetes.client`` API class; its HTTP method
  and path come from that class's generated ``_<name>_serialize`` (so ``read_namespaced_pod``
  is ``GET /api/v1/namespaces/{namespace}/pods/{name}``: get pods), ``watch=True`` makes it
  a watch;
- raw calls ``<x>.request("PATCH", <path>, query=...)`` (``autoscale.kube.KubeApi``): the
  method is the literal, the path is resolved from f-strings, local assignments,
  ``self.<attr> = ...`` in the class and ``@property`` methods of the modules scanned;
  what cannot be resolved becomes ``{}`` (a path segment known only at run time). A query
  with a ``"watch"`` key makes it a watch. Paths that resolve to something other than the
  Kubernetes API (``/api/...``, ``/apis/...``) are other HTTP clients and are skipped.

A path whose API group or resource is ``{}`` (``ScaleTarget.path``: the autoscaler's target
is configuration) is matched against the concrete paths the caller passes in
(``configured``), e.g. the scale path of the target in the deployed switchyard.yaml.

Verbs follow the API server's request-info rules: GET on a collection is ``list`` (``watch``
with the watch parameter), on a named object ``get``; POST ``create``; PUT ``update``; PATCH
``patch``; DELETE ``delete`` (``deletecollection`` on a collection).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = ["Access", "CallSite", "accesses", "call_sites", "resolve_access", "typed_method"]

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
UNKNOWN = "{}"
_SERIALIZE = re.compile(r"method='(\w+)',\s*resource_path='([^']+)'")
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_TYPED = re.compile(r"^(list|read|create|replace|patch|delete|connect)_\w+$")


@dataclass(frozen=True, order=True, slots=True)
class Access:
    """One RBAC permission: ``Access("apps", "deployments/scale", "patch")``."""

    group: str
    resource: str
    verb: str


@dataclass(frozen=True, order=True, slots=True)
class CallSite:
    """One API call in the source: where, the HTTP method, the path template, watch or not."""

    module: str
    line: int
    method: str
    path: str
    watch: bool


@cache
def _api_sources() -> tuple[str, ...]:
    """The source of every generated API module of ``kubernetes.client`` (read as text:
    importing all of them takes seconds)."""
    import kubernetes.client

    folder = Path(kubernetes.client.__file__).parent / "api"
    return tuple(path.read_text() for path in sorted(folder.glob("*_api.py")))


@cache
def typed_method(name: str) -> tuple[str, str] | None:
    """(HTTP method, path template with ``{}``) of the ``kubernetes.client`` API method
    ``name``, from its generated ``_<name>_serialize``; None when no API module has it (or
    two disagree)."""
    found: set[tuple[str, str]] = set()
    head = f"def _{name}_serialize("
    for text in _api_sources():
        start = text.find(head)
        if start < 0:
            continue
        end = text.find("\n    def ", start + len(head))
        match = _SERIALIZE.search(text, start, end if end > 0 else len(text))
        if match:
            found.add((match.group(1), re.sub(r"\{[^}]*\}", UNKNOWN, match.group(2))))
    return next(iter(found)) if len(found) == 1 else None


class _Resolver:
    """Turns a path expression into a template, within one module's AST."""

    def __init__(self, trees: dict[str, ast.Module]) -> None:
        self.trees = trees
        self.parents: dict[ast.AST, ast.AST] = {}
        self.properties: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
        for tree in trees.values():
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    self.parents[child] = node
                if isinstance(node, _FUNCTIONS) and any(
                    isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
                ):
                    self.properties.setdefault(node.name, []).append(node)

    def _enclosing(
        self, node: ast.AST, kind: type[ast.AST] | tuple[type[ast.AST], ...]
    ) -> ast.AST | None:
        cur = self.parents.get(node)
        while cur is not None and not isinstance(cur, kind):
            cur = self.parents.get(cur)
        return cur

    def _assigned(self, scope: ast.AST | None, match: str, before: int) -> ast.expr | None:
        """The value of the last ``<match> = value`` in ``scope`` (by source line)."""
        if scope is None:
            return None
        best: tuple[int, ast.expr] | None = None
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(ast.unparse(t) == match for t in targets) and node.lineno <= before:
                    if best is None or node.lineno >= best[0]:
                        best = (node.lineno, node.value)
        return best[1] if best else None

    def value(self, expr: ast.expr | None, depth: int = 0) -> ast.expr | None:
        """The expression behind a name or attribute (one level), else ``expr`` itself."""
        if expr is None or depth > 8:
            return expr
        if isinstance(expr, ast.Name):
            fn = self._enclosing(expr, _FUNCTIONS)
            found = self._assigned(fn, expr.id, expr.lineno)
            return self.value(found, depth + 1) if found is not None else expr
        if isinstance(expr, ast.Attribute) and ast.unparse(expr.value) == "self":
            cls = self._enclosing(expr, ast.ClassDef)
            found = self._assigned(cls, ast.unparse(expr), 10**9)
            if found is not None:
                return self.value(found, depth + 1)
        if isinstance(expr, ast.Attribute) and len(self.properties.get(expr.attr, [])) == 1:
            (prop,) = self.properties[expr.attr]
            returns = [n.value for n in ast.walk(prop) if isinstance(n, ast.Return) and n.value]
            if len(returns) == 1:
                return self.value(returns[0], depth + 1)
        return expr

    def template(self, expr: ast.expr | None, depth: int = 0) -> str:
        expr = self.value(expr)
        if depth > 8 or expr is None:
            return UNKNOWN
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return expr.value
        if isinstance(expr, ast.JoinedStr):
            parts = []
            for part in expr.values:
                if isinstance(part, ast.Constant):
                    parts.append(str(part.value))
                elif isinstance(part, ast.FormattedValue):
                    inner = self.template(part.value, depth + 1)
                    # A fragment is a path piece only when it looks like one; a quoted
                    # name, a namespace, a version: known at run time only.
                    parts.append(inner if inner.startswith("/") else UNKNOWN)
            return "".join(parts)
        if isinstance(expr, ast.IfExp):  # e.g. "/apis/{group}/..." if group else "/api/..."
            return self.template(expr.body, depth + 1)
        return UNKNOWN

    def has_watch(self, query: ast.expr | None) -> bool:
        value = self.value(query)
        if isinstance(value, ast.Dict):
            return any(isinstance(k, ast.Constant) and k.value == "watch" for k in value.keys)
        return False


def call_sites(modules: dict[str, str]) -> list[CallSite]:
    """Every Kubernetes API call in ``modules`` (name -> source)."""
    trees = {name: ast.parse(src, filename=name) for name, src in modules.items()}
    resolver = _Resolver(trees)
    sites: list[CallSite] = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            attr = node.func.attr
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            typed = typed_method(attr) if _TYPED.match(attr) else None
            if typed is not None:
                method, path = typed
                watch = kwargs.get("watch")
                is_watch = isinstance(watch, ast.Constant) and watch.value is True
                sites.append(CallSite(name, node.lineno, method, path, is_watch))
            elif (
                attr == "request"
                and len(node.args) >= 2
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in HTTP_METHODS
            ):
                path = resolver.template(node.args[1])
                if path.startswith(("/api/", "/apis/")):
                    query_watch = resolver.has_watch(kwargs.get("query"))
                    verb = str(node.args[0].value)
                    sites.append(CallSite(name, node.lineno, verb, path, query_watch))
    return sorted(sites)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape(UNKNOWN), "[^/]+") + "$")


def resolve_access(site: CallSite, configured: Iterable[str] = ()) -> Access:
    """The permission one call needs; raises ValueError when its group or resource is
    neither in the source nor in a ``configured`` path matching its template."""
    path = site.path
    segments = path.strip("/").split("/")
    core = segments[0] == "api"
    group, rest = ("", segments[2:]) if core else (segments[1], segments[3:])
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    if UNKNOWN in (group, rest[0] if rest else UNKNOWN):
        matches = sorted({p for p in configured if _pattern(path).match(p)})
        if len(matches) != 1:
            raise ValueError(
                f"{site.module}:{site.line} {site.method} {path}: the API group or resource is "
                f"known at run time only, and {len(matches)} configured paths match it"
            )
        return resolve_access(
            CallSite(site.module, site.line, site.method, matches[0], site.watch), ()
        )
    resource = rest[0]
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    verb = {
        "GET": ("get" if named else "watch" if site.watch else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }[site.method]
    return Access(group, resource, verb)


def accesses(sites: Iterable[CallSite], configured: Iterable[str] = ()) -> set[Access]:
    configured = tuple(configured)
    return {resolve_access(site, configured) for site in sites}


def sources(root: Path, packages: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(relative path, source) of every module of ``packages`` under ``root``."""
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            yield str(path.relative_to(root)), path.read_text()
