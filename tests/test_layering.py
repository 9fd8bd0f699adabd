"""The import direction of DESIGN.md, enforced: a package may import only the ones below it,
and inside gateway/ a module only the layers below its own (GATEWAY_LAYERS and the rules after
it; a new gateway module gets a row there)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"gateway", "routing", "kvcache", "autoscale", "enginesim", "benchmarks"}
ALLOWED = {
    "kvcache": set(),
    "routing": {"kvcache"},
    "enginesim": {"kvcache"},
    "autoscale": {"routing", "kvcache"},
    "gateway": {"routing", "kvcache", "autoscale", "enginesim"},
}
# Policies are pure: no web framework, HTTP client or Redis in routing/ or kvcache's pure modules.
FORBIDDEN_THIRD_PARTY = {
    "routing": {"fastapi", "starlette", "httpx", "redis", "uvicorn"},
    "kvcache": {"fastapi", "starlette", "uvicorn"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_design_allows(package: str) -> None:
    files = _modules(package)
    assert files, f"package {package} has no modules"
    bad: list[str] = []
    for path in files:
        used = _imports(path)
        for name in sorted((used & OURS) - ALLOWED[package] - {package}):
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
        for name in sorted(used & FORBIDDEN_THIRD_PARTY.get(package, set())):
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import gateway.app\nfrom routing import Policy\n")
    assert _imports(sample) == {"gateway", "routing"}


# -- the gateway's internal layers ---------------------------------------------------------
# Top first: a gateway module may import modules of lower layers only. Every module under
# gateway.routes counts as the one unit "gateway.routes" (its modules share helpers).
GATEWAY_LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer)
    for layer in (
        {"gateway", "gateway.cli"},  # the package's facade and the console script
        {"gateway.workers", "gateway.quickstart"},
        {"gateway.runner"},
        {"gateway.app", "gateway.metrics_catalog"},  # the catalog builds every subsystem
        {"gateway.routes"},
        {"gateway.services"},
        {"gateway.lora"},  # LoRA: registry, on-demand loads, placement wired together
        {"gateway.placement"},
        {"gateway.lora_loader"},
        {"gateway.lora_actuator"},
        {"gateway.lora_metrics", "gateway.adapter_source"},
        {"gateway.adapters"},
        {"gateway.sharedstate"},  # replicas' routing state through Redis
        {"gateway.autoscaling"},  # the autoscaler wired in (embedded and standalone)
        {"gateway.proxy", "gateway.router", "gateway.health", "gateway.scraper",
         "gateway.kvevents", "gateway.quota", "gateway.discovery"},  # fmt: skip
        {"gateway.kvtier"},  # KV-tier residency lookups for the router
        {"gateway.metrics", "gateway.prefix", "gateway.upstream", "gateway.middleware",
         "gateway.responses", "gateway.server", "gateway.shutdown", "gateway.admission",
         "gateway.ratelimit", "gateway.ratelimit_rules", "gateway.keys", "gateway.redislink",
         "gateway.streamusage", "gateway.accesslog"},  # fmt: skip
        {"gateway.endpoints"},
        {"gateway.errors", "gateway.context", "gateway.settings", "gateway.parsing",
         "gateway.usage", "gateway.logs", "gateway.tasks", "gateway.exchange",
         "gateway.principal", "gateway.outliers", "gateway.ratelimit_local",
         "gateway.ratelimit_lua", "gateway.redisurl",
         "gateway.sharedwire", "gateway.pods", "gateway.metricspec"},  # fmt: skip
    )
)
# Imports inside one layer are violations unless listed here (module -> what it may import).
SAME_LAYER_ALLOWED: dict[str, frozenset[str]] = {
    "gateway.kvevents": frozenset({"gateway.router"}),  # KV events feed the router's index
    "gateway.proxy": frozenset({"gateway.health"}),  # a failed attempt marks its engine down
    # Keys and limits share state through the one Redis link.
    "gateway.ratelimit": frozenset({"gateway.redislink", "gateway.ratelimit_rules"}),
    "gateway.keys": frozenset({"gateway.redislink"}),
    # Admission meters its queue and lets the shutdown drain end its waiters.
    "gateway.admission": frozenset({"gateway.metrics", "gateway.shutdown"}),
    # Leaves: shared request types and the modules every layer uses; nothing above them.
    "gateway.context": frozenset(),
    "gateway.settings": frozenset({"gateway.redisurl"}),  # redis_url is checked at load
    "gateway.errors": frozenset({"gateway.context", "gateway.settings"}),
    "gateway.parsing": frozenset({"gateway.context", "gateway.settings", "gateway.errors"}),
    "gateway.usage": frozenset({"gateway.context", "gateway.settings", "gateway.errors"}),
    "gateway.logs": frozenset({"gateway.context", "gateway.settings", "gateway.errors"}),
    "gateway.tasks": frozenset({"gateway.context", "gateway.settings", "gateway.errors"}),
    "gateway.exchange": frozenset({"gateway.parsing", "gateway.errors", "gateway.context",
                                   "gateway.principal"}),
    "gateway.principal": frozenset(),
    "gateway.outliers": frozenset({"gateway.settings"}),
    # The limiter's pure parts: its in-process windows and its Redis script (leaves).
    "gateway.ratelimit_local": frozenset(),
    "gateway.ratelimit_lua": frozenset(),
    "gateway.redisurl": frozenset(),  # redis_url's forms, parsed (standard library only)
    "gateway.pods": frozenset(),  # discovery's pure part: pod -> endpoint (no client)
    "gateway.metricspec": frozenset(),  # MetricSpec, declared next to each collector
}
# Stated outright, whatever the layers above say (module -> what it must never import).
GATEWAY_FORBIDDEN: dict[str, frozenset[str]] = {
    "gateway.proxy": frozenset(
        {"gateway.router", "gateway.routes", "gateway.app", "gateway.services"}
    ),
    "gateway.router": frozenset(
        {"gateway.proxy", "gateway.routes", "gateway.app", "gateway.services"}
    ),
}
# Unit -> the only units that may import it.
IMPORTED_ONLY_BY: dict[str, frozenset[str]] = {"gateway.routes": frozenset({"gateway.app"})}


def _unit(module: str) -> str:
    return "gateway.routes" if module.startswith("gateway.routes.") else module


def _gateway_imports(path: Path) -> set[str]:
    """The gateway modules ``path`` imports (``from gateway.x import y`` names ``gateway.x.y``
    when that is a module), relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return {name for name in found if name == "gateway" or name.startswith("gateway.")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _gateway_graph() -> dict[str, set[str]]:
    """Unit -> the other units it imports, over every module of gateway/."""
    graph: dict[str, set[str]] = {}
    for path in _modules("gateway"):
        unit = _unit(_module_name(path))
        graph.setdefault(unit, set()).update(_unit(m) for m in _gateway_imports(path))
    return {unit: deps - {unit} for unit, deps in graph.items()}


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {unit: i for i, layer in enumerate(GATEWAY_LAYERS) for unit in layer}
    bad = [f"{u} has no layer: add it to GATEWAY_LAYERS" for u in sorted(graph) if u not in rank]
    for unit, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if unit not in rank or dep not in rank:
                pass  # reported above: every gateway module is a key of the graph
            elif rank[dep] < rank[unit]:
                bad.append(f"{unit} imports {dep}, a higher layer")
            elif rank[dep] == rank[unit] and dep not in SAME_LAYER_ALLOWED.get(unit, ()):
                bad.append(f"{unit} imports {dep} of its own layer (not in SAME_LAYER_ALLOWED)")
            if dep in GATEWAY_FORBIDDEN.get(unit, ()):
                bad.append(f"{unit} imports {dep}, forbidden")
            if dep in IMPORTED_ONLY_BY and unit not in IMPORTED_ONLY_BY[dep]:
                bad.append(f"{unit} imports {dep}, which only {sorted(IMPORTED_ONLY_BY[dep])} may")
    return bad


def test_gateway_modules_import_only_lower_layers() -> None:
    graph = _gateway_graph()
    assert {"gateway.proxy", "gateway.router", "gateway.routes", "gateway.errors"} <= set(graph)
    assert not _layer_violations(graph), "\n".join(_layer_violations(graph))


@pytest.mark.parametrize(
    ("importer", "imported", "message"),
    [
        ("gateway.proxy", "gateway.router", "gateway.proxy imports gateway.router of its own"),
        ("gateway.router", "gateway.proxy", "gateway.router imports gateway.proxy, forbidden"),
        ("gateway.proxy", "gateway.services", "gateway.proxy imports gateway.services, a higher"),
        ("gateway.services", "gateway.routes", "which only ['gateway.app'] may"),
        ("gateway.errors", "gateway.parsing", "gateway.errors imports gateway.parsing of its own"),
        ("gateway.exchange", "gateway.proxy", "gateway.exchange imports gateway.proxy, a higher"),
        ("gateway.settings", "gateway.context", "gateway.settings imports gateway.context of"),
        ("gateway.newmodule", "gateway.errors", "gateway.newmodule has no layer"),
    ],
)
def test_layer_checker_sees_a_planted_violation(importer: str, imported: str, message: str) -> None:
    graph = _gateway_graph()
    assert not any(message in line for line in _layer_violations(graph))
    graph.setdefault(importer, set()).add(imported)
    assert any(message in line for line in _layer_violations(graph)), _layer_violations(graph)


def test_gateway_imports_resolve_submodules() -> None:
    sample = ROOT / "gateway" / "routes" / "openai.py"
    assert "gateway.services" in _gateway_imports(sample)
    assert _unit("gateway.routes.admin") == "gateway.routes"
    assert _unit("gateway.app") == "gateway.app"
