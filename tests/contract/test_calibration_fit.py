"""The calibration fit (benchmarks/engine/calibrate.py) recovers known step-time coefficients.

Pure arithmetic, no engine: it lives here because it belongs to the real-engine tooling and
runs with ``make test-engine``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.engine.calibrate import (
    Observation,
    decode_features,
    fit_all,
    fit_nnls,
    load_observations,
    predict,
    predict_obs,
    prefill_features,
)

TRUE = [0.018, 0.0005, 5e-7, 0.0008, 3e-6]
TRUE_LORA = [0.02, 0.001, 2e-6]


def _synthetic(*, lora: bool) -> list[Observation]:
    obs = []
    for p in (128, 256, 512, 1024, 1536):
        f = prefill_features(p)
        obs.append(Observation("prefill", f"P={p}", f, predict(TRUE, f)))
        if lora:
            extra = TRUE_LORA[0] + TRUE_LORA[1] * p + TRUE_LORA[2] * p * p / 2
            y = predict(TRUE, f) + extra
            obs.append(Observation("lora-prefill", f"lora P={p}", f, y, p))
    for ctx in (64, 768):
        for b in (1, 4, 8):
            f = decode_features(b, ctx + 32)
            y = predict(TRUE, f)
            obs.append(Observation("decode", f"B={b} ctx={ctx}", f, y))
            if lora and ctx == 64:
                extra = TRUE_LORA[0] + TRUE_LORA[1] * b + TRUE_LORA[2] * b * b / 2
                obs.append(Observation("lora-decode", f"lora B={b}", f, y + extra, b))
    return obs


def test_fit_recovers_exact_coefficients() -> None:
    coef, lora = fit_all(_synthetic(lora=True))
    assert coef == pytest.approx(TRUE, rel=1e-6)
    assert lora == pytest.approx(TRUE_LORA, rel=1e-6)
    for o in _synthetic(lora=True):
        assert predict_obs(coef, lora, o) == pytest.approx(o.seconds, rel=1e-9)


def test_fit_without_lora_observations_leaves_lora_term_zero() -> None:
    _coef, lora = fit_all(_synthetic(lora=False))
    assert lora == [0.0, 0.0, 0.0]


def test_nnls_clamps_a_negative_coefficient_to_zero() -> None:
    # y = 2 - x would need a negative slope: the constrained fit drops that column.
    features = [(1.0, float(x)) for x in range(5)]
    coef = fit_nnls(features, [2.0 - x for x in range(5)], [1.0] * 5)
    assert coef[1] == 0.0
    assert coef[0] == pytest.approx(0.0, abs=1e-9)


def test_refit_reads_back_what_a_calibration_run_stored(tmp_path: Path) -> None:
    obs = _synthetic(lora=True)
    stored = {
        "date": "2026-11-28",
        "engine_startup_s": 28.0,
        "engine_log": {"kv_cache_tokens": "46,592"},
        "hardware": {"cpu": "x"},
        "observations": [asdict(o) for o in obs],
    }
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(stored), encoding="utf-8")
    loaded, startup, facts, stamp, machine = load_observations(path)
    assert loaded == obs
    assert (startup, facts, stamp, machine) == (28.0, {"kv_cache_tokens": "46,592"},
                                                "2026-11-28", {"cpu": "x"})  # fmt: skip
    _coef, lora = fit_all(loaded)
    assert lora == pytest.approx(TRUE_LORA, rel=1e-6)
