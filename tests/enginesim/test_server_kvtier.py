"""``--kv-tier``: two simulated engines share one real redis-server's block index (keys only).

Engine 0 computes a long prompt and writes its full prompt blocks as size-only values in the
residency namespace; engine 1 then loads what it does not hold locally and reports vLLM's
connector counters. Redis down: engines still answer, as a miss. The tier client's counters are
on ``/metrics`` as the Switchyard connector's ``vllm:switchyard_kvtier_<name>_total``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from enginesim.cli import config_from_args
from enginesim.cluster import ClusterConfig
from enginesim.core.api import EngineStats
from enginesim.core.profile import load_profile
from enginesim.server.kvtier import TierClientStats
from enginesim.server.metrics import SIM_TIER_COUNTERS, TIER_COUNTERS, EngineMetrics
from kvcache.hashing import hash_token_blocks
from kvcache.tier import block_key, read_header, residency_namespace
from kvcache.tierplan import COUNTERS
from tests.contract.helpers import MetricsSnapshot, scrape
from tests.contract.tier_metrics import assert_vllm_accounting, tier_counters
from tests.enginesim.server_harness import MODEL, running_cluster
from tests.redis_server import RedisServer

BS = 128
PROFILE = load_profile("cpu-smollm2")


def _prompt(tag: int, n: int) -> list[int]:
    return [1000 + (tag * 7919 + i * 31) % 40000 for i in range(n)]


def _complete(client: httpx.Client, prompt: list[int], n: int = 1) -> dict[str, object]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "n": n, "temperature": 1.0}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    out: dict[str, object] = resp.json()
    return out


def _kvtier(snap: MetricsSnapshot, name: str) -> float:
    """A ``vllm:switchyard_kvtier_<name>_total`` counter; KeyError when it is not exported."""
    family = snap.families[f"vllm:switchyard_kvtier_{name}"]
    assert family[0] == "counter"
    return snap.value(f"vllm:switchyard_kvtier_{name}_total", model_name=MODEL, engine="0")


def _kvtier_delta(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, float]:
    names = [*TIER_COUNTERS, *SIM_TIER_COUNTERS]
    return {n: _kvtier(after, n) - _kvtier(before, n) for n in names}


def _wait_counter(client: httpx.Client, name: str, want: float, timeout_s: float = 10.0) -> None:
    """The background writer's counters move after the response: poll (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _kvtier(scrape(client), name) >= want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} stayed at {_kvtier(scrape(client), name)}, wanted {want}")


def _wait_keys(r: redis.Redis, keys: list[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if r.exists(*keys) == len(keys):
            return
        time.sleep(0.05)
    raise AssertionError(f"only {r.exists(*keys)} of {len(keys)} keys written")


def test_a_second_engine_loads_what_the_first_computed(redis_server: RedisServer) -> None:
    cfg = ClusterConfig(engines=2, base_port=0, speed=20.0, model=MODEL, kv_tier=redis_server.url)
    prompt = _prompt(1, 5 * BS + 17)  # 5 full blocks, all 5 loadable
    ns = residency_namespace(MODEL, BS)
    keys = [block_key(ns, h) for h in hash_token_blocks(prompt, BS, model=MODEL)]
    r = redis.Redis.from_url(redis_server.url)
    with running_cluster(cfg) as (e0, e1):
        with httpx.Client(base_url=e0.url, timeout=30) as c0:
            _complete(c0, prompt)
        _wait_keys(r, keys)
        for key in keys:  # size-only values recording one block's KV bytes
            value = r.get(key)
            assert isinstance(value, bytes)
            header = read_header(ns, bytes.fromhex(key.rsplit(b":", 1)[1].decode()), value)
            assert header is not None and header.size_only
            assert header.nbytes == BS * PROFILE.kv_bytes_per_token
            ttl = r.ttl(key)
            assert isinstance(ttl, int) and 0 < ttl <= 3600
        with httpx.Client(base_url=e1.url, timeout=30) as c1:
            before = tier_counters(scrape(c1), MODEL)
            _complete(c1, prompt)
            d = tier_counters(scrape(c1), MODEL) - before
    assert_vllm_accounting(d, prompt_tokens=len(prompt), connector=True, external=5 * BS)
    assert d.by_source["local_compute"] == 17


def test_local_hit_first_then_the_tier_for_the_rest(redis_server: RedisServer) -> None:
    cfg = ClusterConfig(engines=2, base_port=0, speed=20.0, model=MODEL, kv_tier=redis_server.url)
    prompt = _prompt(2, 4 * BS + 1)  # 4 loadable blocks
    with running_cluster(cfg) as (e0, e1):
        with httpx.Client(base_url=e0.url, timeout=30) as c0:
            _complete(c0, prompt)
        r = redis.Redis.from_url(redis_server.url)
        ns = residency_namespace(MODEL, BS)
        _wait_keys(r, [block_key(ns, h) for h in hash_token_blocks(prompt, BS, model=MODEL)])
        with httpx.Client(base_url=e1.url, timeout=30) as c1:
            _complete(c1, prompt[: 2 * BS] + [7, 7, 7])  # engine 1 computes 2 blocks itself
            before = tier_counters(scrape(c1), MODEL)
            _complete(c1, prompt)
            d = tier_counters(scrape(c1), MODEL) - before
    assert_vllm_accounting(d, prompt_tokens=len(prompt), connector=True, external=2 * BS)
    assert d.prefix_hits == 2 * BS
    assert d.external_queries == len(prompt) - 2 * BS


def test_redis_down_is_a_miss_not_an_error() -> None:
    server = RedisServer().start()
    url = server.url
    server.stop()
    cfg = ClusterConfig(engines=1, base_port=0, speed=20.0, model=MODEL, kv_tier=url,
                        kv_tier_timeout_s=0.2)  # fmt: skip
    prompt = _prompt(3, 3 * BS)
    with running_cluster(cfg) as (e0,), httpx.Client(base_url=e0.url, timeout=30) as c0:
        before_k = scrape(c0)
        before = tier_counters(before_k, MODEL)
        out = _complete(c0, prompt)
        d = tier_counters(scrape(c0), MODEL) - before
        assert e0.runtime.tier is not None
        assert e0.runtime.tier.lookup_store.stats().errors >= 1
        # The failed lookup and the failed write, told apart (each has its own store): the
        # writer's 3 full prompt blocks are counted failed once its one try is spent.
        _wait_counter(c0, "save_failed_blocks", 3)
        k = _kvtier_delta(before_k, scrape(c0))
    assert out["choices"]
    assert_vllm_accounting(d, prompt_tokens=len(prompt), connector=True, external=0)
    assert (k["lookups"], k["lookup_errors"], k["sim_lookup_found_blocks"]) == (1, 1, 0)
    assert (k["save_blocks"], k["save_failed_blocks"]) == (0, 3)


def test_cli_flag_sets_the_tier() -> None:
    cfg = config_from_args(["--kv-tier", "redis://127.0.0.1:6399/0", "--kv-tier-ttl-s", "60"])
    assert (cfg.kv_tier, cfg.kv_tier_ttl_s) == ("redis://127.0.0.1:6399/0", 60.0)
    assert config_from_args([]).kv_tier is None


def test_tier_counters_on_metrics_move_with_lookups_and_writes(redis_server: RedisServer) -> None:
    cfg = ClusterConfig(engines=2, base_port=0, speed=20.0, model=MODEL, kv_tier=redis_server.url)
    prompt = _prompt(4, 5 * BS + 17)  # 5 full blocks, all 5 loadable
    with running_cluster(cfg) as (e0, e1):
        with httpx.Client(base_url=e0.url, timeout=30) as c0:
            before = scrape(c0)
            assert all(_kvtier(before, n) == 0 for n in TIER_COUNTERS)
            _complete(c0, prompt)
            _wait_counter(c0, "save_blocks", 5)  # written by the background writer
            d0 = _kvtier_delta(before, scrape(c0))
        with httpx.Client(base_url=e1.url, timeout=30) as c1:
            before = scrape(c1)
            _complete(c1, prompt)
            d1 = _kvtier_delta(before, scrape(c1))
    # Engine 0: one lookup of 5 blocks, none held; its 5 computed prompt blocks written.
    assert d0 == {
        "lookups": 1,
        "lookup_errors": 0,
        "declines": 0,
        "save_blocks": 5,
        "save_existing_blocks": 0,
        "save_failed_blocks": 0,
        "save_dropped_blocks": 0,
        "sim_lookup_calls": 1,
        "sim_lookup_blocks": 5,
        "sim_lookup_found_blocks": 0,
    }
    # Engine 1: the tier holds all 5; it loads them and writes nothing (none computed).
    assert (d1["lookups"], d1["sim_lookup_found_blocks"], d1["save_blocks"]) == (1, 5, 0)


def test_n_choices_share_one_tier_lookup(redis_server: RedisServer) -> None:
    cfg = ClusterConfig(engines=1, base_port=0, speed=20.0, model=MODEL, kv_tier=redis_server.url)
    prompt = _prompt(5, 3 * BS + 5)  # 3 loadable blocks
    with running_cluster(cfg) as (e0,), httpx.Client(base_url=e0.url, timeout=30) as c0:
        tier = e0.runtime.tier
        assert tier is not None
        sent = tier.lookup_store.stats().lookups
        before = scrape(c0)
        out = _complete(c0, prompt, n=2)
        d = _kvtier_delta(before, scrape(c0))
        sent = tier.lookup_store.stats().lookups - sent
    assert isinstance(out["choices"], list) and len(out["choices"]) == 2
    # One round trip to Redis for the prompt; vLLM's connector would count each of the two
    # child requests as a lookup, and so does enginesim's ``lookups``.
    assert (sent, d["sim_lookup_calls"], d["sim_lookup_blocks"]) == (1, 1, 3)
    assert d["lookups"] == 2


def test_tier_counters_use_the_connectors_names_and_only_with_a_tier() -> None:
    core = EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks=8,
                       block_size=BS, prefix_cache_queries=0, prefix_cache_hits=0,
                       num_preemptions=0, prompt_tokens=0, generation_tokens=0, max_loras=0,
                       tier_declines=4, tier_dropped_writes=2)  # fmt: skip
    tier = TierClientStats(lookups=11, lookup_errors=3, save_blocks=7, save_existing_blocks=5,
                           save_failed_blocks=6, save_dropped_blocks=1, sim_lookup_calls=9,
                           sim_lookup_blocks=30, sim_lookup_found_blocks=12,
                           sim_save_queued_blocks=8)  # fmt: skip

    def families(
        tier_stats: Callable[[], TierClientStats] | None,
    ) -> dict[str, tuple[str, str, float]]:
        m = EngineMetrics(
            model_name=MODEL, max_model_len=2048, stats_fn=lambda: core, tier_stats_fn=tier_stats
        )
        return {
            f.name: (f.type, f.documentation, f.samples[0].value)
            for f in text_string_to_metric_families(m.render().decode())
            if f.name.startswith("vllm:switchyard_kvtier_")
        }

    assert families(None) == {}
    got = families(lambda: tier)
    assert set(TIER_COUNTERS) <= set(COUNTERS)  # the real connector's names, its meaning
    assert not set(SIM_TIER_COUNTERS) & set(COUNTERS)
    want = {"lookups": 11, "lookup_errors": 3, "declines": 4, "save_blocks": 7,
            "save_existing_blocks": 5, "save_failed_blocks": 6,
            "save_dropped_blocks": 1 + 2,  # the writer's queue and the core's
            "sim_lookup_calls": 9, "sim_lookup_blocks": 30,
            "sim_lookup_found_blocks": 12}  # fmt: skip
    for name, value in want.items():
        doc = SIM_TIER_COUNTERS.get(
            name, f"Switchyard KV tier connector: {name.replace('_', ' ')}."
        )
        assert got.pop(f"vllm:switchyard_kvtier_{name}") == ("counter", doc, value)
    assert got.pop("vllm:switchyard_kvtier_sim_save_queued_blocks")[::2] == ("gauge", 8)
    assert got == {}
