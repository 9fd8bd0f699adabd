"""The Grafana dashboards against the fields of Grafana's dashboard JSON model that decide
whether an import works and the panels show data: schemaVersion, version, uid, title, the
templating list (a ``datasource`` variable of type datasource, ``model`` and ``engine``
query variables), panels with unique ids, a type, a gridPos inside the 24-column grid, a
description, a unit, and targets with refId, expr and the ``${datasource}`` uid. Also:
the provisioning files, and the committed JSON equals what deploy/grafana/build.py writes.

Queries are evaluated against a real Prometheus in test_prometheus.py."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.observability.dashboards import GRAFANA, builder, dashboards, substitute

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat", "row"}
# Grafana unit ids the dashboards may use (packages/grafana-data valueFormats).
UNITS = {"reqps", "ops", "percentunit", "s", "short", "bytes", "none"}
UID = re.compile(r"[a-zA-Z0-9_-]{1,40}")


def _typed(value: Any, kind: type, where: str) -> Any:
    assert isinstance(value, kind), f"{where}: {type(value).__name__}, wanted {kind.__name__}"
    return value


@pytest.fixture(scope="module")
def all_dashboards() -> dict[str, dict[str, Any]]:
    found = dashboards()
    assert len(found) == 7, sorted(found)
    return found


def test_the_committed_json_is_what_the_builder_writes() -> None:
    build = builder()
    expected = {f"{d.uid.removeprefix('switchyard-')}.json": build.dump(d)
                for d in build.DASHBOARDS}  # fmt: skip
    on_disk = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert on_disk == expected, "run: python deploy/grafana/build.py"


def test_the_operations_doc_lists_every_panel_query() -> None:
    build = builder()
    doc = build.DOC.read_text()
    assert doc == build.with_table(doc), "run: python deploy/grafana/build.py"
    for dash in build.DASHBOARDS:
        for _, row in dash.rows:
            for panel in row:
                assert f"| {panel.title} |" in doc, panel.title


def test_dashboard_fields(all_dashboards: dict[str, dict[str, Any]]) -> None:
    uids = set()
    for name, dash in all_dashboards.items():
        assert _typed(dash.get("schemaVersion"), int, name) >= 36, name
        assert _typed(dash.get("version"), int, name) >= 1, name
        assert UID.fullmatch(_typed(dash.get("uid"), str, name)), name
        assert _typed(dash.get("title"), str, name).startswith("Switchyard / "), name
        assert _typed(dash.get("description"), str, name), name
        _typed(dash.get("time"), dict, name)
        _typed(dash.get("annotations", {}).get("list"), list, name)
        uids.add(dash["uid"])
    assert len(uids) == len(all_dashboards), "dashboard uids must be unique"


def test_templating(all_dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dash in all_dashboards.items():
        variables = {v["name"]: v for v in _typed(dash["templating"]["list"], list, name)}
        assert set(variables) == {"datasource", "model", "engine"}, name
        ds = variables["datasource"]
        assert ds["type"] == "datasource" and ds["query"] == "prometheus", name
        for var in ("model", "engine"):
            v = variables[var]
            assert v["type"] == "query" and v["datasource"] == DATASOURCE, (name, var)
            assert re.fullmatch(r"label_values\([a-z_:]+, [a-z_]+\)", v["definition"])
            assert v["query"] == v["definition"], (name, var)
            # "All" as the regex .* (Grafana's default joins every value into a long regex)
            assert v["includeAll"] and v["allValue"] == ".*" and v["multi"], (name, var)


def test_panels(all_dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dash in all_dashboards.items():
        panels = _typed(dash["panels"], list, name)
        ids = [p["id"] for p in panels]
        assert all(isinstance(i, int) and i > 0 for i in ids), name
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for panel in panels:
            where = f"{name} #{panel['id']} {panel.get('title')!r}"
            assert panel["type"] in PANEL_TYPES, where
            _typed(panel.get("title"), str, where)
            grid = panel["gridPos"]
            assert set(grid) == {"h", "w", "x", "y"}, where
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
            if panel["type"] == "row":
                assert panel["panels"] == [] and "targets" not in panel, where
                continue
            assert _typed(panel.get("description"), str, where).strip(), where
            assert panel["datasource"] == DATASOURCE, where
            assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, where
            targets = _typed(panel.get("targets"), list, where)
            assert targets, where
            refs = [t["refId"] for t in targets]
            assert len(set(refs)) == len(refs) and all(refs), where
            for target in targets:
                assert target["datasource"] == DATASOURCE, where
                assert _typed(target.get("expr"), str, where).strip(), where


def test_panels_do_not_overlap(all_dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dash in all_dashboards.items():
        cells: dict[tuple[int, int], int] = {}
        for panel in dash["panels"]:
            g = panel["gridPos"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: #{panel['id']} overlaps #{cells[x, y]}"
                    cells[x, y] = panel["id"]


def test_filters_use_the_variables(all_dashboards: dict[str, dict[str, Any]]) -> None:
    """Series that carry a model or an engine are filtered by ``$model`` / ``$engine``
    (checked on the metric families that have those labels)."""
    per_engine = ("vllm:", "switchyard_proxy_requests_total", "switchyard_endpoint_")
    for dash in all_dashboards.values():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for metric in re.findall(r"([a-z_:]+)\{([^}]*)\}", expr):
                    name, selector = metric
                    if name.startswith(per_engine):
                        assert 'endpoint=~"$engine"' in selector, (panel["title"], expr)
                    if name.startswith("vllm:"):
                        assert 'model_name=~"$model"' in selector, (panel["title"], expr)


def test_substitution() -> None:
    expr = 'rate(x{model=~"$model", endpoint=~"${engine}"}[$__rate_interval])'
    assert substitute(expr, model="m", engine="a|b", rate_interval="1m") == (
        'rate(x{model=~"m", endpoint=~"a|b"}[1m])'
    )
    with pytest.raises(AssertionError):
        substitute("x{a=~'$tenant'}", model="m", engine="e", rate_interval="1m")


def test_provisioning() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/switchyard.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
