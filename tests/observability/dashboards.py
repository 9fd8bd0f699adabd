"""The committed Grafana dashboards, loaded for the tests: the builder module (by path: it
lives under deploy/, not in a package), the JSON files, and every panel query with its
variables substituted as Grafana would."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"


def builder() -> ModuleType:
    """deploy/grafana/build.py as a module."""
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    """File name -> the dashboard JSON, for every committed dashboard."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


@dataclass(frozen=True, slots=True)
class PanelQuery:
    dashboard: str
    panel_id: int
    title: str
    ref_id: str
    expr: str


def panel_queries() -> list[PanelQuery]:
    """Every target of every non-row panel, in dashboard order."""
    out = []
    for dash in dashboards().values():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                out.append(PanelQuery(dash["title"], panel["id"], panel["title"],
                                      target["refId"], target["expr"]))  # fmt: skip
    return out


_VARIABLE = re.compile(r"\$\{?(__rate_interval|model|engine)\}?")


def substitute(expr: str, *, model: str, engine: str, rate_interval: str) -> str:
    """``expr`` as Grafana sends it: ``$model``/``$engine`` replaced by their (regex) values,
    ``$__rate_interval`` by a duration. An unknown ``$`` variable is an error."""
    values = {"__rate_interval": rate_interval, "model": model, "engine": engine}
    out = _VARIABLE.sub(lambda m: values[m.group(1)], expr)
    assert "$" not in out, f"unsubstituted variable in {out!r}"
    return out
