"""``switchyard sim``: its options fill enginesim's one ClusterConfig (defaults included)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import enginesim.cli
from enginesim.cluster import ClusterConfig
from gateway.cli import app


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ClusterConfig()),
        (
            ["--engines", "3", "--base-port", "0", "--profile", "p.json", "--speed", "2.5",
             "--kv-events", "--model", "m", "--host", "0.0.0.0"],
            ClusterConfig(engines=3, base_port=0, profile="p.json", speed=2.5, kv_events=True,
                          model="m", host="0.0.0.0"),
        ),
    ],
)  # fmt: skip
def test_sim_options_fill_the_cluster_config(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: ClusterConfig
) -> None:
    seen: list[ClusterConfig] = []
    monkeypatch.setattr(enginesim.cli, "run_sim", seen.append)
    result = CliRunner().invoke(app, ["sim", *argv])
    assert result.exit_code == 0, result.output
    assert seen == [expected]
