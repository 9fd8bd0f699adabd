"""LLM-aware routing end to end: gateway -> real ``enginesim`` processes on loopback.

One enginesim process serves 3 engines (``llama3-8b-a100`` profile, speed 20) with a small
local ``tokenizer.json`` and KV events over ZMQ; gateways with different routing settings run
in threads in front of them. Engine-reported counters (``vllm:prefix_cache_hits``) are the
ground truth for cache reuse, never the gateway's own beliefs.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.ports import free_port_block
from gateway.app import create_app
from gateway.settings import EngineConfig
from routing import parse_vllm_metrics
from tests.gateway.conftest import gateway_settings
from tests.gateway.servers import ServerThread, wait_until

MODEL = "llama3-test"
WORDS = [f"w{i}" for i in range(3000)]


def _write_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer.json: one id per ``wN`` word, ChatML specials, punctuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for word in ["user", "assistant", "system", *WORDS, "?", ".", ","]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


@dataclass
class Sim:
    urls: list[str]
    kv_urls: list[str]
    tokenizer: Path
    proc: subprocess.Popen[bytes]

    def prefix_hits(self) -> float:
        return sum(
            parse_vllm_metrics(httpx.get(f"{u}/metrics", timeout=5).text).prefix_hits
            for u in self.urls
        )


def _start_sim(tmp: Path, *, engines: int, profile: str, kv_events: bool) -> Sim:
    base = free_port_block(engines * 2)
    tokenizer = _write_tokenizer(tmp)
    argv = [sys.executable, "-m", "enginesim", "--engines", str(engines),
            "--base-port", str(base), "--profile", profile, "--speed", "20",
            "--model", MODEL, "--tokenizer", str(tokenizer)]  # fmt: skip
    if kv_events:
        argv += ["--kv-events", "--kv-events-base-port", str(base + engines)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls = [f"http://127.0.0.1:{base + i}" for i in range(engines)]
    kv_urls = [f"tcp://127.0.0.1:{base + engines + i}" for i in range(engines)]

    def up() -> bool:
        try:
            return all(httpx.get(f"{u}/health", timeout=1).status_code == 200 for u in urls)
        except httpx.HTTPError:
            return proc.poll() is not None

    if not (wait_until(up, timeout=90) and proc.poll() is None):
        proc.kill()
        raise RuntimeError("enginesim did not start")
    return Sim(urls, kv_urls, tokenizer, proc)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    started = _start_sim(
        tmp_path_factory.mktemp("sim"), engines=3, profile="llama3-8b-a100", kv_events=True
    )
    try:
        yield started
    finally:
        started.proc.terminate()
        started.proc.wait(timeout=15)


def _gateway(sim: Sim, *, kv_events: bool = False, **routing: Any) -> ServerThread:
    engines = [
        EngineConfig(url=u, id=f"e{i}", kv_events=sim.kv_urls[i] if kv_events else None)
        for i, u in enumerate(sim.urls)
    ]
    settings = gateway_settings(sim.urls, engines=engines, routing=routing)
    return ServerThread(create_app(settings))


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _chat(
    client: httpx.Client,
    gw: ServerThread,
    messages: list[dict[str, str]],
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, **extra}
    resp = client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers or {})
    assert resp.status_code == 200, resp.text
    return resp


def _group_hits(sim: Sim, policy: str, seed: int) -> tuple[float, list[list[str]]]:
    """4 groups x 6 requests sharing a ~600-token system prompt; engine-reported hits."""
    rng = random.Random(seed)
    before = sim.prefix_hits()
    placements: list[list[str]] = []
    with _gateway(sim, policy=policy) as gw, httpx.Client(timeout=30) as client:
        for _ in range(4):
            system = _text(rng, 600)
            seen = []
            for _ in range(6):
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": _text(rng, 8) + " ?"}]  # fmt: skip
                seen.append(_chat(client, gw, messages).headers["x-switchyard-endpoint"])
            placements.append(seen)
    return sim.prefix_hits() - before, placements


def test_prefix_policy_keeps_a_prefix_on_one_engine_and_hits_more(sim: Sim) -> None:
    prefix_hits, prefix_placements = _group_hits(sim, "prefix-cache", seed=1)
    rr_hits, rr_placements = _group_hits(sim, "round-robin", seed=2)
    # Every repeat of a group lands where its prefix already is...
    assert all(len(set(group)) == 1 for group in prefix_placements), prefix_placements
    # ...while the groups themselves spread (cold prefixes are not piled on one engine).
    assert len({group[0] for group in prefix_placements}) >= 2, prefix_placements
    assert all(len(set(group)) == 3 for group in rr_placements)
    # Engine-reported: 5 of 6 prompts hit per group vs 3 of 6 under round-robin.
    assert prefix_hits > rr_hits * 1.3, (prefix_hits, rr_hits)


def test_unique_prompts_spread_across_engines(sim: Sim) -> None:
    rng = random.Random(3)
    prompts = [_text(rng, 300) for _ in range(12)]
    with _gateway(sim, policy="prefix-cache") as gw, httpx.Client(timeout=30) as client:

        def one(prompt: str) -> str:
            resp = _chat(client, gw, [{"role": "user", "content": prompt}], max_tokens=40,
                         ignore_eos=True)  # fmt: skip
            return resp.headers["x-switchyard-endpoint"]

        with ThreadPoolExecutor(6) as pool:
            counts = Counter(pool.map(one, prompts))
        sequential = Counter(one(p) for p in [_text(rng, 300) for _ in range(9)])
    assert len(counts) == 3 and max(counts.values()) <= 6, counts
    assert len(sequential) == 3 and max(sequential.values()) <= 4, sequential


def test_session_affinity_sticks_by_header_and_user(sim: Sim) -> None:
    rng = random.Random(4)
    with _gateway(sim, policy="session-affinity") as gw, httpx.Client(timeout=30) as client:
        owners = {}
        for session in [f"s{i}" for i in range(8)]:
            seen = {
                _chat(client, gw, [{"role": "user", "content": _text(rng, 5)}],
                      headers={"x-session-id": session}).headers["x-switchyard-endpoint"]
                for _ in range(4)
            }  # fmt: skip
            assert len(seen) == 1, (session, seen)
            owners[session] = seen.pop()
        assert len(set(owners.values())) >= 2, owners  # sessions spread over engines
        by_user = {
            _chat(client, gw, [{"role": "user", "content": _text(rng, 5)}],
                  user="alice").headers["x-switchyard-endpoint"]
            for _ in range(4)
        }  # fmt: skip
        assert len(by_user) == 1


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_kv_events_reach_the_precise_index(sim: Sim) -> None:
    """Token blocks (local tokenizer.json, engine block size) + KV events: a repeat of a prompt
    matches through the engine's BlockStored reports alone (speculative entries off)."""
    rng = random.Random(5)
    prefix = {"tokenizer": str(sim.tokenizer), "speculative_ttl_s": 0.0}
    system = _text(rng, 200)
    gw_ctx = _gateway(sim, kv_events=True, policy="prefix-cache", prefix=prefix)
    with gw_ctx as gw, httpx.Client(timeout=30) as client:
        assert wait_until(
            lambda: _metric(client.get(f"{gw.url}/metrics").text,
                            "switchyard_prefix_index_precise_endpoints") == 3.0, timeout=20
        )  # fmt: skip

        def stored(eid: str) -> float:
            text = client.get(f"{gw.url}/metrics").text
            value = _metric(text, "switchyard_kv_events_blocks_total", endpoint=eid, event="stored")
            return value or 0.0

        first = None
        for _ in range(5):  # a SUB socket may miss the very first batch while connecting
            messages = [{"role": "system", "content": system}, {"role": "user", "content": "q ?"}]
            first = _chat(client, gw, messages).headers["x-switchyard-endpoint"]
            if wait_until(lambda eid=first: stored(eid) >= 12, timeout=5):
                break
        assert first is not None and stored(first) >= 12
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "r ?"}]
        again = _chat(client, gw, messages)
        route = again.headers["x-switchyard-route"]
        assert again.headers["x-switchyard-endpoint"] == first, route
        assert "mode=tokens" in route and "block_tokens=16" in route, route
        match = re.search(r"match=(\S+)", route)
        assert match is not None and match.group(1).startswith(f"{first}:"), route
        assert int(match.group(1).split(":")[1].split(",")[0]) >= 12, route
        metrics = client.get(f"{gw.url}/metrics").text
        precise = _metric(metrics, "switchyard_prefix_index_source_pairs", source="precise")
        assert precise is not None and precise >= 12
        assert (_metric(metrics, "switchyard_prefix_index_bytes") or 0) > 0


def test_config_profile_debug_header_and_unknown_policy(sim: Sim) -> None:
    profile = {"scorers": [{"type": "prefix-cache", "weight": 2},
                           {"type": "least-kv-cache", "weight": 1}]}  # fmt: skip
    rng = random.Random(6)
    with (
        _gateway(sim, policy="sticky", profiles={"sticky": profile}) as gw,
        httpx.Client(timeout=30) as client,
    ):
        messages = [{"role": "user", "content": _text(rng, 100)}]
        first = _chat(client, gw, messages)
        assert first.headers["x-switchyard-route"].startswith("sticky;")
        assert "prefix-cache:" in first.headers["x-switchyard-route"]
        second = _chat(client, gw, messages)
        assert second.headers["x-switchyard-endpoint"] == first.headers["x-switchyard-endpoint"]
        owner = first.headers["x-switchyard-endpoint"]
        assert f"match={owner}:" in second.headers["x-switchyard-route"]
        other = _chat(client, gw, messages, headers={"x-switchyard-routing": "least-request"})
        assert other.headers["x-switchyard-route"].startswith("least-request;")
        bad = client.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": MODEL, "messages": messages},
            headers={"x-switchyard-routing": "nope"},
        )
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["param"] == "x-switchyard-routing" and "sticky" in error["message"]
        metrics = client.get(f"{gw.url}/metrics").text
        assert (_metric(metrics, "switchyard_routing_decisions_total", policy="sticky",
                        outcome="hit") or 0) >= 1  # fmt: skip
        assert "switchyard_routing_prefix_hit_blocks_total{" in metrics


def test_scraper_fills_waiting_and_kv_usage(tmp_path: Path) -> None:
    """A 1-engine sim with max_num_seqs=1: concurrent streams queue, the scrape shows it."""
    profile = json.loads(
        (Path(__file__).parents[2] / "enginesim/profiles/llama3-8b-a100.json").read_text()
    )
    profile.update(name="tiny-batch", max_num_seqs=1)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(profile))
    one = _start_sim(tmp_path, engines=1, profile=str(path), kv_events=False)
    try:
        settings = gateway_settings(one.urls, routing={"scrape_interval_s": 0.1})
        with ServerThread(create_app(settings)) as gw, httpx.Client(timeout=60) as client:
            metrics_url = f"{gw.url}/metrics"
            eid = one.urls[0].removeprefix("http://")
            body = {"model": MODEL, "messages": [{"role": "user", "content": _text(
                random.Random(7), 400)}], "max_tokens": 400, "ignore_eos": True}  # fmt: skip

            def post() -> int:
                return client.post(f"{gw.url}/v1/chat/completions", json=body).status_code

            with ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(post) for _ in range(3)]

                def queued() -> bool:
                    text = client.get(metrics_url).text
                    waiting = _metric(text, "switchyard_endpoint_waiting_requests", endpoint=eid)
                    usage = _metric(text, "switchyard_endpoint_kv_usage_ratio", endpoint=eid)
                    return (waiting or 0) >= 1 and (usage or 0) > 0

                assert wait_until(queued, timeout=30)
                assert [f.result() for f in futures] == [200, 200, 200]
            text = client.get(metrics_url).text
            assert _metric(text, "switchyard_endpoint_scraped_timestamp_seconds", endpoint=eid)
    finally:
        one.proc.terminate()
        one.proc.wait(timeout=15)
