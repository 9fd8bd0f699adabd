"""The import direction of DESIGN.md, enforced: a package may import only the ones below it."""

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
