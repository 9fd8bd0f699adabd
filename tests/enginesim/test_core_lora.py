"""LoRA: registry, slot LRU, swap-in latency charged once, max_loras per batch, stats."""

from __future__ import annotations

import pytest

from enginesim.core.api import SimRequest
from enginesim.core.engine import EngineCore
from enginesim.core.lora import LoraManager
from enginesim.core.profile import EngineProfile
from tests.enginesim.tiny_profile import tiny_profile


def _profile(**kw: object) -> EngineProfile:
    lora: dict[str, object] = {
        "num_gpu_blocks": 64,
        "c_attn_s": 0.0,
        "c_ctx_s": 0.0,
        "max_loras": 1,
        "max_cpu_loras": 2,
        "lora_load_bytes_per_s": 1e9,
        "lora_disk_bytes_per_s": 2.5e8,
        "lora_load_overhead_s": 0.0,
    }
    return tiny_profile(**{**lora, **kw})


def _req(rid: str, max_tokens: int, adapter: str | None = None) -> SimRequest:
    return SimRequest(rid, (1, 2, 3), max_tokens, 0.0, adapter=adapter, ignore_eos=True)


def test_slot_lru_eviction_order_and_costs() -> None:
    m = LoraManager(max_loras=2, max_cpu_loras=3, bytes_per_s=1e9, disk_bytes_per_s=2.5e8)
    for name in ("a", "b", "c"):
        m.load(name, size_bytes=500_000_000)
    sizes = dict.fromkeys(("a", "b", "c", "d"), 500_000_000)
    assert m.activate(["a"], sizes) == 0.5
    assert m.activate(["b"], sizes) == 0.5
    assert m.activate(["a", "b"], sizes) == 0.0  # both resident: free
    assert m.gpu_slots == ("a", "b")
    assert m.activate(["a"], sizes) == 0.0  # touching a makes b the LRU slot
    assert m.activate(["c"], sizes) == 0.5
    assert m.gpu_slots == ("a", "c")
    assert m.activate(["c", "b"], sizes) == 0.5  # a is LRU and not needed
    assert m.gpu_slots == ("c", "b") and m.swap_ins == 4


def test_cpu_cache_miss_adds_disk_read() -> None:
    m = LoraManager(max_loras=1, max_cpu_loras=2, bytes_per_s=1e9, disk_bytes_per_s=2.5e8)
    for name in ("a", "b", "c"):  # the third load pushes a out of the CPU cache
        m.load(name, size_bytes=500_000_000)
    assert m.cpu_cache == ("b", "c")
    assert m.activate(["a"], {"a": 500_000_000}) == 0.5 + 2.0
    assert m.cpu_cache == ("c", "a")


def test_registry_errors() -> None:
    m = LoraManager(max_loras=1, max_cpu_loras=1, bytes_per_s=1e9)
    m.load("a", size_bytes=1)
    with pytest.raises(ValueError, match="already been loaded"):
        m.load("a", size_bytes=1)
    with pytest.raises(KeyError):
        m.unload("ghost")
    m.unload("a")
    assert m.registered == ()
    off = LoraManager(max_loras=0, max_cpu_loras=0, bytes_per_s=1e9)
    with pytest.raises(ValueError, match="disabled"):
        off.load("a", size_bytes=1)


def test_engine_charges_swap_once_and_caps_adapters_per_batch() -> None:
    core = EngineCore(_profile())
    core.load_adapter("a", size_bytes=500_000_000)
    core.load_adapter("b", size_bytes=250_000_000)
    core.add_request(_req("ra", 2, "a"))
    core.add_request(_req("rb", 2, "b"))  # second adapter: skipped while a runs
    core.add_request(_req("base", 3))  # may overtake rb: it needs no adapter
    s = core.stats()
    assert (s.running_adapters, s.waiting_adapters) == ((), ("a", "b"))
    assert s.loaded_adapters == ("a", "b") and s.scheduled_adapters == ()

    res = core.step(0.0)  # prefill ra + base (6 tokens) + swap a in
    assert sorted(o.request_id for o in res.outputs) == ["base", "ra"]
    assert res.duration_s == 0.5 + 6 * 0.25 + 0.5
    s = core.stats()
    assert (s.running_adapters, s.waiting_adapters, s.num_waiting) == (("a",), ("b",), 1)
    assert s.scheduled_adapters == ("a",)  # b never scheduled: vLLM does not list it

    res = core.step(0.0)  # two decodes, a already resident: no swap; ra finishes
    assert res.duration_s == 0.5 + 2 * 0.125
    assert [(o.request_id, o.finished) for o in res.outputs] == [("ra", "length"), ("base", None)]

    res = core.step(0.0)  # base decodes, rb prefills and b replaces a in the only slot
    assert res.duration_s == 0.5 + 0.125 + 3 * 0.25 + 0.25
    assert core.lora.gpu_slots == ("b",)
    res = core.step(0.0)
    assert res.duration_s == 0.5 + 0.125  # base finished last step; rb decodes, b resident
    assert not core.has_work() and core.lora.swap_ins == 2
    assert core.stats().running_adapters == core.stats().scheduled_adapters == ()


def test_scheduled_adapters_follow_aborts() -> None:
    core = EngineCore(_profile())
    core.load_adapter("a", size_bytes=0)
    core.load_adapter("b", size_bytes=0)
    core.add_request(_req("ra", 5, "a"))
    core.add_request(_req("rb", 5, "b"))
    core.step(0.0)
    assert core.stats().scheduled_adapters == ("a",)
    core.abort_request("rb")  # waiting, never scheduled
    assert core.stats().scheduled_adapters == ("a",)
    core.abort_request("ra")  # running
    assert core.stats().scheduled_adapters == ()


def test_unload_keeps_queued_requests_running() -> None:
    core = EngineCore(_profile())
    core.load_adapter("a", size_bytes=0)
    core.add_request(_req("ra", 2, "a"))
    core.unload_adapter("a")
    assert core.stats().loaded_adapters == ()
    outs = [o for _ in range(3) for o in core.step(0.0).outputs]
    assert [o.finished for o in outs] == [None, "length"]
    with pytest.raises(ValueError, match="not loaded"):
        core.add_request(_req("rb", 2, "a"))


def test_lora_compute_cost_per_step_and_per_adapter_token() -> None:
    core = EngineCore(_profile(max_loras=2, c_lora_step_s=0.0625, c_lora_token_s=0.015625))
    core.load_adapter("a", size_bytes=0)
    core.add_request(_req("ra", 2, "a"))
    core.add_request(_req("base", 2))
    res = core.step(0.0)  # 6 prefill tokens, 3 of them for the adapter; swap-in costs 0
    assert res.duration_s == 0.5 + 6 * 0.25 + 0.0625 + 3 * 0.015625
    res = core.step(0.0)  # two decodes, one with the adapter
    assert res.duration_s == 0.5 + 2 * 0.125 + 0.0625 + 0.015625
    core.add_request(_req("base2", 1))
    assert core.step(0.0).duration_s == 0.5 + 3 * 0.25  # no adapter in the batch: no LoRA term


def test_lora_quadratic_term_counts_all_adapter_tokens_of_the_step() -> None:
    """c_lora_quad * L**2 / 2 over the step's adapter tokens (two requests: L = 6, not 3 + 3)."""
    core = EngineCore(_profile(max_loras=2, c_lora_quad_s=0.125))
    core.load_adapter("a", size_bytes=0)
    core.load_adapter("b", size_bytes=0)
    core.add_request(_req("ra", 2, "a"))
    core.add_request(_req("rb", 2, "b"))
    res = core.step(0.0)  # 6 adapter prefill tokens
    assert res.duration_s == 0.5 + 6 * 0.25 + 0.125 * 6 * 6 / 2
    res = core.step(0.0)  # two adapter decodes: L = 2
    assert res.duration_s == 0.5 + 2 * 0.125 + 0.125 * 2 * 2 / 2


def test_a_preempted_request_keeps_its_adapter_scheduled() -> None:
    core = EngineCore(_profile(max_loras=2, num_gpu_blocks=6))
    core.load_adapter("a", size_bytes=0)
    core.load_adapter("b", size_bytes=0)
    core.add_request(SimRequest("ra", tuple(range(1, 9)), 10, 0.0, adapter="a", ignore_eos=True))
    core.add_request(SimRequest("rb", tuple(range(11, 19)), 10, 0.0, adapter="b", ignore_eos=True))
    for _ in range(20):  # 6 blocks hold 2 x 12 tokens: then rb (newest) is preempted
        core.step(0.0)
        if core.stats().num_preemptions:
            break
    s = core.stats()
    assert s.num_preemptions == 1
    assert (s.running_adapters, s.waiting_adapters) == (("a",), ("b",))
    assert s.scheduled_adapters == ("a", "b")  # vLLM still lists a preempted request's
    core.abort_request("rb")
    assert core.stats().scheduled_adapters == ("a",)
