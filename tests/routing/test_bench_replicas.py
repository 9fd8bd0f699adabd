"""The routing benchmark's replica contenders (``gateway-<N>r``): the round-robin spread over
replicas, the contender name, the shared-state counters read back, the comparison with one
gateway, and the redis-server it starts (a real one, stopped by PID)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from benchmarks.routing import launch
from benchmarks.routing.loadgen import RoundRobinTargets
from benchmarks.routing.report import RunSummary, compare_replicas, print_replicas
from benchmarks.routing.runner import gateway_replicas, parse_series
from benchmarks.routing.workloads import WORKLOADS, generate


def test_round_robin_spreads_requests_by_index() -> None:
    rr = RoundRobinTargets(("http://a", "http://b"), headers={"x": "1"})
    requests = generate("shared-prefix", WORKLOADS["quick"], rate=1.0)[:6]
    routed = [rr.route(r) for r in requests]
    assert [r.base_url for r in routed] == ["http://a", "http://b"] * 3
    assert all(r.headers == {"x": "1"} for r in routed)
    with pytest.raises(ValueError):
        RoundRobinTargets(())


@pytest.mark.parametrize(
    ("kind", "replicas"),
    [("gateway-2r", 2), ("gateway-3r", 3), ("gateway-2r-local", 2), ("gateway", None),
     ("gateway-0r", None), ("gateway-2", None), ("gateway-2r-lo", None), ("inproc", None)],
)  # fmt: skip
def test_gateway_replicas_parses_the_contender_kind(kind: str, replicas: int | None) -> None:
    assert gateway_replicas(kind) == replicas


def test_parse_series_reads_exactly_the_named_series() -> None:
    text = (
        "# HELP switchyard_shared_state_replicas x\n"
        "switchyard_shared_state_replicas 2.0\n"
        'switchyard_shared_state_prefix_records_total{direction="sent"} 12.0\n'
        'switchyard_shared_state_prefix_records_total{direction="received"} 9.0\n'
        "switchyard_shared_state_replicas_other 5.0\n"
    )
    sent = 'switchyard_shared_state_prefix_records_total{direction="sent"}'
    names = ("switchyard_shared_state_replicas", sent, "absent")
    assert parse_series(text, names) == {
        "switchyard_shared_state_replicas": 2.0,
        'switchyard_shared_state_prefix_records_total{direction="sent"}': 12.0,
    }


def _row(contender: str, hit: float | None, split: list[float], **extra: Any) -> RunSummary:
    n = len(split)
    dev = max(abs(s * n - 1.0) for s in split) if split else None
    return RunSummary(
        workload="shared-prefix", contender=contender, rate_rps=9.5, fraction=0.8,
        requests=10, ok=10, errors={}, ttft_p50_s=0.05, ttft_p90_s=0.1, ttft_p99_s=0.2,
        itl_p50_s=0.01, output_tok_per_s=500.0, engine_hit_rate=hit, load_split=split,
        load_split_max_dev=dev, extra=extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("many_hit", "many_split", "met"),
    [
        (0.84, [0.25, 0.25, 0.25, 0.25], [True, True]),
        (0.76, [0.25, 0.25, 0.25, 0.25], [True, True]),  # 0.76 >= 0.9 x 0.84
        (0.75, [0.25, 0.25, 0.25, 0.25], [False, True]),
        (0.84, [0.34, 0.22, 0.22, 0.22], [True, False]),  # a hot spot: dev 0.36 > 0.2 + 0.1
    ],
)
def test_compare_replicas_targets(
    many_hit: float, many_split: list[float], met: list[bool]
) -> None:
    rows = [
        _row("gateway:prefix-cache", 0.84, [0.3, 0.2, 0.25, 0.25]),  # max dev 0.2
        _row(
            "gateway-2r:prefix-cache",
            many_hit,
            many_split,
            rounds=[{"engine_hit_rate": many_hit}],
            shared_state=[{"x": 1.0}],
        ),  # fmt: skip
        _row("inproc:round-robin", 0.4, [0.25] * 4),
    ]
    (cmp,) = compare_replicas(rows, single="gateway:prefix-cache",
                              replicated="gateway-2r:prefix-cache")  # fmt: skip
    assert [t["met"] for t in cmp["targets"]] == met
    assert [r["contender"] for r in cmp["rows"]] == ["gateway:prefix-cache",
                                                      "gateway-2r:prefix-cache"]  # fmt: skip
    assert cmp["rows"][1]["hit_rounds"] == [many_hit]
    assert cmp["rows"][1]["shared_state"] == [{"x": 1.0}]
    print_replicas([cmp])  # prints without failing


def test_compare_replicas_needs_both() -> None:
    rows = [_row("gateway:prefix-cache", 0.84, [0.25] * 4)]
    assert compare_replicas(rows, single="gateway:prefix-cache", replicated="gateway-2r:x") == []
    rows.append(_row("gateway-2r:x", None, []))
    (cmp,) = compare_replicas(rows, single="gateway:prefix-cache", replicated="gateway-2r:x")
    assert cmp["targets"] == []  # nothing measured: no verdict


def test_start_redis_answers_and_stops(tmp_path: Path) -> None:
    proc, url = launch.start_redis(log_dir=tmp_path)
    try:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(16).startswith(b"+PONG")
    finally:
        proc.stop()
    assert not proc.alive()


def test_start_redis_without_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("benchmarks.routing.launch.shutil.which", lambda name: None)
    with pytest.raises(launch.LaunchError, match="not installed"):
        launch.start_redis(log_dir=tmp_path)


def test_compare_replicas_takes_the_median_split_over_rounds() -> None:
    even, skewed = [0.25] * 4, [0.31, 0.25, 0.19, 0.25]
    rounds = [{"load_split": s, "load_split_max_dev": d}
              for s, d in ((even, 0.0), (skewed, 0.25), (even, 0.02))]  # fmt: skip
    rows = [
        _row("gateway:prefix-cache", 0.84, even),
        _row("gateway-2r:prefix-cache", 0.84, skewed, rounds=rounds),  # the chosen round
    ]
    (cmp,) = compare_replicas(rows, single="gateway:prefix-cache",
                              replicated="gateway-2r:prefix-cache")  # fmt: skip
    assert cmp["rows"][1]["split_max_dev"] == 0.02
    assert cmp["rows"][1]["split_rounds"] == [even, skewed, even]
    assert [t["met"] for t in cmp["targets"]] == [True, True]
