"""The seven contenders: one ``autoscaling:`` section each, differing only in the policy.

Every contender runs the same autoscaler embedded in the gateway (``gateway/autoscaling.py``:
the gateway's own counts plus the engines' scraped ``vllm:`` gauges, a 1 s decision loop on a
clock scaled to the emulator's speed, the same actuator limits), so they all see the same
signals path; only ``policy`` and ``policy_settings`` change. Targets shared by several policies
come from one :class:`Capacity` of the benchmark engine (README "Contenders")::

    section = autoscaling_section(CONTENDERS["kpa"], capacity=Capacity(), common=common)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CONTENDERS", "NAMES", "Capacity", "Contender", "autoscaling_section"]

NAMES = ("hpa-waiting", "hpa-kv", "kpa", "apa", "proactive", "slo", "static")
PROFILES = Path(__file__).resolve().parents[2] / "enginesim" / "profiles"


@dataclass(frozen=True, slots=True)
class Capacity:
    """What one replica of the benchmark engine sustains within the SLO.

    ``rps`` and ``concurrency`` were measured on one engine with the standard request size
    (README "Capacity"); the token rates follow from the profile like the proactive policy's
    own defaults (flat-out prefill rate x 0.73 = its 8,000 of ~11,000 on the stock A100 profile).
    """

    rps: float = 2.0  # requests/s of the standard size per replica (TTFT p90 ~1.1 s there)
    concurrency: float = 2.5  # requests in flight per replica at that rate (Little's law)
    prompt_tokens_per_s: float = 6600.0
    output_tokens_per_s: float = 2500.0
    cold_start_s: float = 120.0

    def needed(self, rps: float) -> int:
        """Replicas a steady ``rps`` of standard requests needs (at least 1)."""
        return max(1, -int(-rps // self.rps))


def prefill_tokens_per_s(profile: str, prompt: int = 3000) -> float:
    """Flat-out prefill tokens/s of an enginesim profile: full ``max_num_batched_tokens``
    chunks of a ``prompt``-token request (step = c0 + c_prefill n + c_attn n (s + n/2))."""
    p = json.loads((PROFILES / f"{profile}.json").read_text())
    n = int(p["max_num_batched_tokens"])
    chunks = max(1, -(-prompt // n))
    total = 0.0
    for k in range(chunks):
        size = min(n, prompt - k * n)
        total += p["c0_s"] + p["c_prefill_s"] * size + p["c_attn_s"] * size * (k * n + size / 2)
    return prompt / total


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    policy: str
    settings: dict[str, Any] = field(default_factory=dict)
    static: bool = False  # starts at, and keeps, the peak replicas


def _policy_settings(
    c: Contender, cap: Capacity, *, peak: int, slo: tuple[float, float]
) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if c.policy == "kpa":
        extra = {"target": cap.concurrency}
    elif c.policy in ("proactive", "slo"):
        extra = {
            "prompt_tokens_per_s": cap.prompt_tokens_per_s,
            "output_tokens_per_s": cap.output_tokens_per_s,
        }
        extra["lead_time_s"] = cap.cold_start_s
        if c.policy == "proactive":
            # The backlog a cold start leaves is drained over the next lead time, not 30 s:
            # pods bought to drain it faster arrive a cold start late and then idle (README).
            extra["backlog_drain_s"] = cap.cold_start_s
            # Headroom for what arrives within a cold start: at 0.7 of the SLO capacity a
            # replica absorbs a ~1.4x rise before a new pod is Ready (0.85 default; README sweep).
            extra["target_utilisation"] = 0.7
        else:
            extra |= {"ttft_slo_s": slo[0], "itl_slo_s": slo[1]}
    elif c.policy == "static":
        extra = {"replicas": peak}
    return {**extra, **c.settings}


CONTENDERS: dict[str, Contender] = {
    # GKE guidance: HPA on vllm:num_requests_waiting (policy default target 5 per pod, 15 s
    # sync, 15 s metric delay of the Prometheus adapter path, 300 s down stabilisation).
    "hpa-waiting": Contender("hpa-waiting", "hpa", {"metric": "waiting"}),
    # AIBrix's sample: HPA on KV-cache usage, target 0.5.
    "hpa-kv": Contender("hpa-kv", "hpa", {"metric": "kv", "target": 0.5}),
    # Knative KPA on concurrency (60 s stable / 6 s panic windows, 2 s tick), target = the
    # in-flight requests one replica holds at its capacity.
    "kpa": Contender("kpa", "kpa"),
    # AIBrix APA (tolerance bands, 10 s evaluation, 180 s window, 300 s down cooldown) on
    # the same per-pod waiting-requests target as hpa-waiting.
    "apa": Contender("apa", "apa", {"metric": "waiting", "target": 5.0}),
    "proactive": Contender("proactive", "proactive"),
    "slo": Contender("slo", "slo"),
    "static": Contender("static", "static", static=True),
}


def autoscaling_section(
    c: Contender,
    *,
    capacity: Capacity,
    peak: int,
    slo: tuple[float, float],
    target: str,
    namespace: str,
    kubeconfig: Path,
    speed: float,
    min_replicas: int,
    max_replicas: int,
) -> dict[str, Any]:
    """The gateway's ``autoscaling:`` section for contender ``c``."""
    return {
        "enabled": True,
        "policy": c.policy,
        "policy_settings": _policy_settings(c, capacity, peak=peak, slo=slo),
        "target": {"name": target, "namespace": namespace},
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        # No actuator cooldowns: each policy's own windows decide (the same for all).
        "scale_up_cooldown_s": 0.0,
        "scale_down_cooldown_s": 0.0,
        "interval_s": 1.0,
        "time_scale": speed,
        "kubeconfig": str(kubeconfig),
        "leader_election": {"enabled": False},  # one gateway
    }
