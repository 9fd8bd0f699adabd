"""Settings: YAML file + SWITCHYARD_ env (``__`` nesting), frozen, validated."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import Settings

YAML = """
server:
  port: 9001
routing:
  policy: least-request
  debug_header: true
health:
  interval_s: 0.5
engines:
  - url: http://127.0.0.1:8100/
  - url: http://127.0.0.1:8101
    id: second
    models: [m1]
"""


def test_yaml_and_env_with_nesting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "switchyard.yaml"
    path.write_text(YAML)
    monkeypatch.setenv("SWITCHYARD_HEALTH__FAIL_THRESHOLD", "5")
    monkeypatch.setenv("SWITCHYARD_SERVER__PORT", "9002")
    settings = Settings.load(path)
    assert settings.server.port == 9002  # env beats the file
    assert settings.health.interval_s == 0.5 and settings.health.fail_threshold == 5
    assert settings.routing.policy == "least-request" and settings.routing.debug_header
    assert [e.url for e in settings.engines] == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert settings.engines[1].id == "second" and settings.engines[1].models == ("m1",)
    assert Settings.load(path, server={"port": 1234}).server.port == 1234  # CLI overrides win


def test_defaults_without_file() -> None:
    settings = Settings.load(None)
    assert settings.server.host == "127.0.0.1" and settings.engines == ()
    assert settings.proxy.max_attempts == 2


def test_frozen_and_strict(tmp_path: Path) -> None:
    settings = Settings.load(None)
    with pytest.raises(ValidationError):
        settings.server = settings.server
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  polcy: random\n")
    with pytest.raises(ValidationError):
        Settings.load(bad)
    bad.write_text("routing:\n  policy: astrology\n")
    with pytest.raises(ValidationError):
        Settings.load(bad)
    bad.write_text("routing:\n  profiles:\n    p:\n      scorers: [{type: nope}]\n")
    with pytest.raises(ValidationError, match="nope"):
        Settings.load(bad)


def test_profile_from_config(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "routing:\n  policy: mine\n  profiles:\n    mine:\n"
        "      scorers: [{type: least-request, weight: 2}]\n      picker: round-robin\n"
    )
    settings = Settings.load(path)
    assert settings.routing.policy == "mine"
    assert settings.routing.profiles["mine"]["picker"] == "round-robin"
    with pytest.raises(FileNotFoundError):
        Settings.load(tmp_path / "missing.yaml")


def test_public_api_is_pinned() -> None:
    import gateway

    assert gateway.__all__ == [
        "FinishedRequest",
        "RequestObserver",
        "Services",
        "Settings",
        "create_app",
    ]
    assert all(hasattr(gateway, name) for name in gateway.__all__)
