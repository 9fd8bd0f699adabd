"""deploy/prometheus/rules.yaml: ``promtool check rules`` and ``promtool test rules`` (the
unit tests in rules_test.yaml fire every alert from synthetic series), every alert has a
firing test and a runbook anchor that exists in docs/operations.md.

promtool comes with the Debian package ``prometheus`` (scripts/services.sh installs it; a
machine without it fails here rather than skipping)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
EXPECTED = {
    "SwitchyardNoHealthyEngine", "SwitchyardHigh5xxRatio", "SwitchyardTTFTOverSLO",
    "SwitchyardEngineEjected", "SwitchyardRedisDegraded", "SwitchyardAutoscalerAtMax",
    "SwitchyardKVCacheNearFull", "SwitchyardLoraLoadsFailing",
}  # fmt: skip


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (make test installs it: scripts/services.sh)")
    return path


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown`` (lower case, punctuation
    dropped, spaces to dashes)."""
    out = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def test_promtool_check_rules() -> None:
    done = subprocess.run(  # noqa: S603
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_test_rules() -> None:
    done = subprocess.run(  # noqa: S603
        [promtool(), "test", "rules", RULES_TEST.name],
        capture_output=True, text=True, timeout=60, cwd=RULES_TEST.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same file with one alert's labels changed does."""
    (tmp_path / "rules.yaml").write_text(RULES.read_text())
    broken = RULES_TEST.read_text().replace("instance: gw-1}", "instance: gw-9}", 1)
    assert broken != RULES_TEST.read_text()
    (tmp_path / "rules_test.yaml").write_text(broken)
    done = subprocess.run(  # noqa: S603
        [promtool(), "test", "rules", "rules_test.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


def test_every_alert_fires_in_a_unit_test_and_stays_silent_in_another() -> None:
    assert {a["alert"] for a in alerts()} == EXPECTED
    fired: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == EXPECTED and silent == EXPECTED


def test_every_alert_has_a_runbook_in_operations_md() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for alert in alerts():
        url = alert["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", url
        assert anchor == alert["alert"].lower() and anchor in anchors, url
        assert alert["labels"]["severity"] in {"critical", "warning"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
