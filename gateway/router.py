"""The gateway side of routing: everything a policy needs, prepared before the pure call.

Per request (:meth:`Router.route`): pick the policy (config default, or the
``x-switchyard-routing`` header; unknown -> 400); if the policy reads prefixes
(:attr:`routing.Policy.reads_prefix`: prefix-cache and profiles using its scorer), hash the
prompt into prefix blocks (:mod:`gateway.prefix`) and look them up in the one
:class:`kvcache.PrefixIndex` (``RouteRequest.prefix_blocks``) -- other policies skip both,
and their requests record nothing in the approximate index; admit the user to the VTC
counters (fairness), and call ``Policy.choose`` on the endpoint snapshots, less the engines
that are ejected (:mod:`gateway.outliers`) or at an admission cap (when the caps leave none
for the model: :class:`gateway.admission.Saturated`, and the request waits). The returned
:class:`Routed` carries the hooks the proxy calls: ``committed`` when an engine's first
byte is relayed (records the prefix in the approximate index for that engine, if it
answered < 400) and ``finished`` once per request (charges and releases the user's VTC
counter).

The index is also fed precisely from KV events (:mod:`gateway.kvevents`); its size is
bounded by ``routing.prefix.max_pairs`` and exported by :class:`RoutingCollector`.

Example::

    router = Router(settings, endpoints, metrics)
    routed = await router.route(kind, fields, model="m", adapter=None, policy=router.policy(None))
    routed.decision.ranked[0]
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from autoscale.arrivals import ArrivalCounter
from gateway.admission import Saturated, why_empty
from gateway.endpoints import EndpointRegistry
from gateway.errors import InvalidField, NoHealthyEndpoint
from gateway.exchange import FinishedRequest
from gateway.kvtier import TierResidency
from gateway.metrics import ENDPOINT, GatewayMetrics
from gateway.metricspec import Label, MetricSpec
from gateway.parsing import Kind, RequestFields
from gateway.prefix import NO_BLOCKS, Blocks, PromptHasher
from gateway.settings import Settings
from kvcache import EndpointFeed, PrefixIndex
from routing import (
    Decision,
    NoEndpointError,
    Policy,
    RouteRequest,
    VirtualTokenCounters,
    build_policies,
    build_profile,
    builtin_policies,
)

log = logging.getLogger(__name__)

ROUTING_HEADER = "x-switchyard-routing"
MAX_SESSION_KEY = 256


def make_policies(settings: Settings) -> dict[str, Policy]:
    """Every built-in policy plus the profiles from the config (a profile may shadow one)."""
    policies = build_policies(builtin_policies())
    for name, spec in settings.routing.profiles.items():
        policies[name] = build_profile(name, spec)
    return policies


@dataclass(slots=True)
class Routed:
    """One routing decision plus the hooks the proxy calls (see module docstring)."""

    router: Router
    route: RouteRequest
    decision: Decision
    blocks: Blocks
    user: str | None
    committed_to: str | None = None
    _released: bool = field(default=False, repr=False)

    def committed(self, endpoint_id: str, status: int) -> None:
        """The engine's answer is being relayed: remember the prefix it now holds."""
        self.committed_to = endpoint_id
        if status < 400 and self.blocks.hashes:
            self.router.index.insert(endpoint_id, self.blocks.hashes)
            outbox = self.router.outbox
            if outbox is not None:  # replicas: published by the next sync (O(1), bounded)
                outbox.append((endpoint_id, self.blocks.hashes))

    def finished(self, record: FinishedRequest) -> None:
        """Once per request, however it ended: settle the user's virtual token counter."""
        if self._released or self.user is None:
            return
        self._released = True
        usage = record.usage or {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        vtc = self.router.vtc
        vtc.charge(
            self.user,
            input_tokens=prompt if isinstance(prompt, int) else self.route.prompt_tokens,
            output_tokens=completion if isinstance(completion, int) else 0,
        )
        vtc.release(self.user)

    def explain(self) -> str:
        """``x-switchyard-route``: scores, each plugin's breakdown, then the prefix lookup."""
        matched = ",".join(f"{eid}:{n}" for eid, n in sorted(self.route.prefix_blocks.items()))
        prefix = f"prefix:mode={self.blocks.mode},blocks={len(self.blocks.hashes)}"
        prefix += f",block_tokens={self.blocks.block_tokens},match={matched or '-'}"
        prefix += f",tier={self.route.tier_blocks}"
        text = " ".join((self.decision.explain(), *self.decision.details, prefix))
        text = "".join(ch if ch.isprintable() else " " for ch in text)
        return text.encode("latin-1", "replace").decode("latin-1")[:2048]


class Router:
    """Owns the policies, the prefix index, the prompt hasher and the VTC counters."""

    def __init__(
        self, settings: Settings, endpoints: EndpointRegistry, metrics: GatewayMetrics
    ) -> None:
        prefix = settings.routing.prefix
        self.settings = settings
        self.endpoints = endpoints
        self.metrics = metrics
        self.policies = make_policies(settings)
        self.index = PrefixIndex(
            max_pairs=prefix.max_pairs,
            ttl_s=prefix.ttl_s,
            speculative_ttl_s=prefix.speculative_ttl_s,
        )
        self.hasher = PromptHasher(prefix)
        self.vtc = VirtualTokenCounters()
        self.feeds: dict[str, EndpointFeed] = {}
        # Prefixes committed since the last sync, for the other replicas; a bounded deque
        # set by gateway/sharedstate.py when redis_url is set (None: nothing shared).
        self.outbox: deque[tuple[str, tuple[int, ...]]] | None = None
        # Client requests arrived, per model, for the embedded autoscaler's arrival rates;
        # set by gateway/services.py when autoscaling is enabled (None: nothing counted).
        # Counted by gateway/routes/proxied.py before admission, not here: a request routed
        # again after an admission wait is still one arrival.
        self.arrivals: ArrivalCounter | None = None
        # Residency in the shared KV tier (kv_tier.enabled; set by gateway/services.py):
        # blocks it holds are warm on every engine (RouteRequest.tier_blocks).
        self.tier: TierResidency | None = None

    def policy(self, name: str | None) -> Policy:
        """The named policy (``None``: the configured default); unknown -> 400."""
        name = name or self.settings.routing.policy
        policy = self.policies.get(name)
        if policy is None:
            known = ", ".join(sorted(self.policies))
            message = f"unknown routing policy {name[:64]!r}; known: {known}"
            raise InvalidField(message, param=ROUTING_HEADER)
        return policy

    def forget(self, endpoint_id: str) -> None:
        """An engine left the pool: drop its prefix entries (O(index size); the admin API and
        Kubernetes discovery call it, never the request path)."""
        self.index.drop_endpoint(endpoint_id)

    async def route(
        self,
        kind: Kind,
        fields: RequestFields,
        *,
        model: str,
        adapter: str | None,
        policy: Policy,
        session_key: str | None = None,
        explain: bool = False,
    ) -> Routed:
        snapshots = self.endpoints.snapshots()
        if policy.reads_prefix:
            block_size = next((s.block_size for s in snapshots if s.block_size), None)
            blocks = await self.hasher.blocks(
                kind, fields.prompt, model=model, adapter=adapter, block_tokens=block_size
            )
        else:  # nothing reads the prefix: no hashing, no lookup, nothing recorded
            blocks = NO_BLOCKS
        matched = self.index.match(blocks.hashes) if blocks.hashes else {}
        tier_blocks = 0
        if self.tier is not None and blocks.hashes:  # bounded: kv_tier.lookup_timeout_s
            tier_blocks = await self.tier.leading(model, blocks)
        # Admission caps (gateway/admission.py): no await from here to the proxy's lease.
        caps = self.settings.admission
        if caps.max_in_flight is not None and self.endpoints.leases >= caps.max_in_flight:
            raise Saturated("the gateway is at max_in_flight")
        routable = self.endpoints.routable(snapshots)  # without ejected engines
        roomy = routable
        if caps.max_per_engine is not None:
            roomy = [s for s in routable if s.in_flight < caps.max_per_engine]
        user = fields.user
        fairness = self.vtc.admit(user) if user else None
        route = RouteRequest(
            model=model,
            seq=self.endpoints.next_seq(),
            adapter=adapter,
            prompt_tokens=blocks.prompt_tokens or fields.prompt_tokens_estimate,
            max_tokens=fields.max_tokens,
            block_hashes=blocks.hashes,
            block_tokens=blocks.block_tokens,
            prefix_blocks=matched,
            tier_blocks=tier_blocks,
            session_key=session_key[:MAX_SESSION_KEY] if session_key else None,
            user=user,
            stream=fields.stream,
            fairness=fairness,
        )
        try:
            decision = policy.choose(route, roomy, explain=explain)
        except NoEndpointError as exc:
            if user:
                self.vtc.release(user)
            why = why_empty(policy, route, everything=snapshots, routable=routable, roomy=roomy)
            self.metrics.decisions.labels(policy=policy.name, outcome=why or "no_endpoint").inc()
            if why == "saturated":
                raise Saturated(f"every engine serving `{fields.model}` is at its cap") from exc
            if why == "ejected":
                raise NoHealthyEndpoint(
                    f"every engine serving model `{fields.model}` is ejected after failed"
                    " requests; retry shortly"
                ) from exc
            raise NoHealthyEndpoint(
                f"no healthy engine serves model `{fields.model}` (filter: {exc.reason})"
            ) from exc
        first = decision.ranked[0]
        chosen = first.id
        hit = matched.get(chosen, 0)
        best = max(matched.values(), default=0)
        outcome = "cold" if best == 0 else ("hit" if hit >= best else "spill")
        self.metrics.decided(policy=policy.name, outcome=outcome, endpoint=chosen,
                             hit_blocks=hit, prompt_blocks=len(blocks.hashes))  # fmt: skip
        if adapter is not None:
            running = adapter in first.running_adapters
            self.metrics.adapter_decisions.labels("running" if running else "cold").inc()
        return Routed(self, route, decision, blocks, user)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_prefix_index_entries", "gauge", "entries"),
    MetricSpec("switchyard_prefix_index_pairs", "gauge", "pairs"),
    MetricSpec("switchyard_prefix_index_max_pairs", "gauge", "pairs"),
    MetricSpec("switchyard_prefix_index_bytes", "gauge", "bytes"),
    MetricSpec("switchyard_prefix_index_precise_endpoints", "gauge", "endpoints"),
    MetricSpec("switchyard_prefix_index_source_pairs", "gauge", "pairs",
               (Label("source", values=("approximate", "precise")),)),
    MetricSpec("switchyard_prefix_index_evictions_total", "counter", "evictions",
               (Label("reason", values=("budget", "ttl")),)),
    MetricSpec("switchyard_kv_events_blocks_total", "counter", "blocks",
               (ENDPOINT, Label("event", values=("stored", "removed")))),
    MetricSpec("switchyard_kv_events_problems_total", "counter", "problems",
               (ENDPOINT, Label("kind", values=("seq_gap", "unchained")))),
)  # fmt: skip
"""The families :class:`RoutingCollector` exports (``kv_events``: engines with KV events)."""


class RoutingCollector(Collector):
    """Prefix-index size and evictions, KV-event feeds and scrape age, read at scrape time."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        stats = self._router.index.stats()
        gauges = (
            ("switchyard_prefix_index_entries", "Block hashes in the prefix index", stats.entries),
            ("switchyard_prefix_index_pairs", "(block, engine) pairs held", stats.pairs),
            ("switchyard_prefix_index_max_pairs", "Budget of (block, engine) pairs",
             stats.max_pairs),
            ("switchyard_prefix_index_bytes", "Estimated memory of the prefix index",
             stats.bytes_estimate),
            ("switchyard_prefix_index_precise_endpoints", "Engines feeding KV events",
             stats.precise_endpoints),
        )  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        pairs = GaugeMetricFamily(
            "switchyard_prefix_index_source_pairs", "Pairs by source", labels=["source"]
        )
        pairs.add_metric(["approximate"], stats.approx_pairs)
        pairs.add_metric(["precise"], stats.precise_pairs)
        yield pairs
        evicted = CounterMetricFamily(
            "switchyard_prefix_index_evictions", "Pairs evicted, by reason", labels=["reason"]
        )
        evicted.add_metric(["budget"], stats.evicted_budget)
        evicted.add_metric(["ttl"], stats.evicted_ttl)
        yield evicted
        blocks = CounterMetricFamily(
            "switchyard_kv_events_blocks",
            "Blocks reported by engines' KV events",
            labels=["endpoint", "event"],
        )
        issues = CounterMetricFamily(
            "switchyard_kv_events_problems",
            "KV-event batches lost (sequence gaps) or blocks with an unknown parent",
            labels=["endpoint", "kind"],
        )
        for eid, feed in sorted(self._router.feeds.items()):
            fs = feed.stats()
            blocks.add_metric([eid, "stored"], fs.stored_blocks)
            blocks.add_metric([eid, "removed"], fs.removed_blocks)
            issues.add_metric([eid, "seq_gap"], fs.seq_gaps)
            issues.add_metric([eid, "unchained"], fs.unchained)
        yield blocks
        yield issues
