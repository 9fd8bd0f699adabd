"""Concurrent loads of one adapter name: a LoRA load now spends the adapter's disk read in
simulated time before registering it (benchmarks/lora relies on it), so two loads can overlap;
exactly one registers, the other gets vLLM's duplicate-load 400, and the adapter is listed once.
(The read's duration itself is not asserted: no wall-clock timings in tests.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from enginesim.cluster import RunningEngine


def test_concurrent_duplicate_load_one_wins(engine: RunningEngine, tmp_path: Path) -> None:
    adapter = tmp_path / "lora-big"
    adapter.mkdir()
    with open(adapter / "adapter_model.safetensors", "wb") as fh:
        fh.truncate(100_000_000_000)  # sparse: 100 GB apparent, 50 s read at 2 GB/s simulated
    body = {"lora_name": "big", "lora_path": str(adapter)}

    def load() -> httpx.Response:
        with httpx.Client(base_url=engine.url, timeout=60.0) as client:
            return client.post("/v1/load_lora_adapter", json=body)

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda _: load(), range(2)))
    assert sorted(r.status_code for r in answers) == [200, 400], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 400)
    assert refused.json()["error"]["message"].startswith("The lora adapter 'big' has already")
    with httpx.Client(base_url=engine.url, timeout=30.0) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids.count("big") == 1
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "big"}).status_code == 200
