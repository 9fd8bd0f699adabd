"""The gateway's one configuration object, loaded once by the CLI and passed down.

Sources, highest priority first: keyword arguments, ``SWITCHYARD_*`` environment variables
(``__`` separates nested sections, e.g. ``SWITCHYARD_HEALTH__INTERVAL_S=2``), the YAML file
named by ``--config``, then the defaults below. Durations are float seconds named ``*_s``.
Nothing else in the project reads the environment.

Example::

    settings = Settings.load("switchyard.yaml")
    settings.proxy.read_timeout_s
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from autoscale.settings import AutoscalingSettings
from gateway.redisurl import parse_redis_url
from routing import build_profile, builtin_policies
from routing.lora import PlacementSettings


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineConfig(_Section):
    """One upstream engine. ``id`` defaults to ``host:port`` of the URL."""

    url: str
    id: str | None = None
    models: tuple[str, ...] = ()
    api_key: SecretStr | None = None  # the engine's own key (vLLM --api-key), if it has one
    # The engine's KV-event PUB socket (vLLM --kv-events-config endpoint), e.g.
    # tcp://10.0.0.5:5557; when set the gateway subscribes and feeds the precise prefix index.
    kv_events: str | None = None

    @field_validator("url")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("engine url must start with http:// or https://")
        return value


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Requests in progress before the gateway answers 503 server_is_overloaded.
    max_concurrent_requests: int = Field(default=4096, gt=0)
    # uvicorn's own connection cap (a backstop; it answers in plain text).
    limit_concurrency: int = Field(default=16384, gt=0)
    graceful_shutdown_s: float = Field(default=5.0, ge=0)
    access_log: bool = True
    # Run `serve` and `up` on uvloop instead of asyncio's loop (benchmarks/overhead measures it).
    uvloop: bool = True
    # Gateway processes sharing the listening socket (``switchyard serve --workers``); see
    # gateway/workers.py for what each worker shares and keeps alone.
    workers: int = Field(default=1, ge=1, le=64)


class ProxySettings(_Section):
    """The upstream sessions (:mod:`gateway.upstream`). ``write_timeout_s`` and
    ``max_keepalive_connections`` went with httpx: aiohttp has neither (the request body is
    bounded by ``total_timeout_s``; idle connections by ``max_connections`` and
    ``keepalive_expiry_s``), and a setting that does nothing is refused, not ignored."""

    connect_timeout_s: float = Field(default=2.0, gt=0)
    read_timeout_s: float = Field(default=300.0, gt=0)
    pool_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=1024, gt=0)
    keepalive_expiry_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=2, ge=1, le=8)
    # A stream still waiting for its first token after this long is committed to its engine
    # and gets ": keep-alive" SSE comments at this interval (0 disables).
    sse_keepalive_s: float = Field(default=10.0, ge=0)
    # Whole-request deadline (read_timeout_s only bounds the gap between chunks).
    total_timeout_s: float = Field(default=900.0, gt=0)
    retry_statuses: tuple[int, ...] = (500, 502, 503, 504)


class PrefixSettings(_Section):
    """How requests are cut into prefix blocks and how many (block, engine) pairs are kept.

    Without ``tokenizer`` (a local ``tokenizer.json`` or a directory holding one) blocks are
    ``block_bytes``-byte blocks of the prompt text (approximate); with it, token blocks of
    ``block_tokens`` tokens over the ChatML-rendered prompt (aligned with the engine's KV
    blocks, so KV events can match). ``max_pairs`` is the index's memory budget (about 300
    bytes per block, see ``kvcache.index``)."""

    block_bytes: int = Field(default=64, gt=0)
    block_tokens: int = Field(default=16, gt=0)
    tokenizer: Path | None = None
    # ChatML default system prompt the engine's template injects (SmolLM2 does), if any.
    default_system: str | None = None
    # Prompts longer than this many characters are tokenised in a worker thread (measured:
    # BPE costs ~0.25 ms per 1,000 chars inline; the thread hop ~60 us; see
    # benchmarks/gateway_overhead.py), so no prompt blocks the event loop for ~1 ms or more.
    thread_above_chars: int = Field(default=4096, ge=0)
    max_pairs: int = Field(default=1_000_000, gt=0)
    ttl_s: float = Field(default=600.0, gt=0)
    speculative_ttl_s: float = Field(default=2.0, ge=0)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not (value.is_file() or (value / "tokenizer.json").is_file()):
            raise ValueError(f"no tokenizer.json at {value} (a file or a directory holding one)")
        return value


class RoutingSettings(_Section):
    """``policy``: a built-in policy name or one of ``profiles`` (built by
    :func:`routing.build_profile`); clients may pick another per request with the
    ``x-switchyard-routing`` header. ``debug_header`` adds ``x-switchyard-route``.
    ``session_header`` names the request header session affinity keys on (else ``user``).
    Engine ``/metrics`` are scraped every ``scrape_interval_s`` (0 disables)."""

    policy: str = "least-request"
    debug_header: bool = False
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    session_header: str = "x-session-id"
    scrape_interval_s: float = Field(default=0.5, ge=0)
    scrape_timeout_s: float = Field(default=1.0, gt=0)
    scrape_concurrency: int = Field(default=32, gt=0)
    prefix: PrefixSettings = PrefixSettings()

    @field_validator("session_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _known_policy(self) -> RoutingSettings:
        known = set(builtin_policies()) | set(self.profiles)
        if self.policy not in known:
            raise ValueError(f"unknown routing policy {self.policy!r}; known: {sorted(known)}")
        for name, spec in self.profiles.items():
            build_profile(name, spec)  # fail at startup, naming the bad entry
        return self


class ApiKeyConfig(_Section):
    """One client key with what it may use. ``models``/``adapters`` omitted = all; limits
    omitted = none. ``name`` labels the key in the admin API and logs (never the key)."""

    key: SecretStr
    name: str | None = None
    models: tuple[str, ...] | None = None
    adapters: tuple[str, ...] | None = None
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    # Limits for each distinct ``user`` field sent with this key.
    user_rpm: int | None = Field(default=None, gt=0)
    user_tpm: int | None = Field(default=None, gt=0)
    tenant: str | None = None
    # Admission priority when engines are busy: higher waits less (the tenant's if unset).
    priority: int | None = None

    @field_validator("key")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 8:
            raise ValueError("an API key must have at least 8 characters")
        return value


class TenantConfig(_Section):
    """Limits shared by every key of a tenant, and its admission priority."""

    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    priority: int = 0


class LimitSettings(_Section):
    """RPM/TPM enforcement (:mod:`gateway.ratelimit`). A per-minute limit is enforced over a
    sliding window: at most ``limit`` in any ``window_s``-second window, scaled by
    ``window_s / 60`` (the default 60 lets a full minute's quota go as one burst; a shorter
    window is a smoother rate: rpm 600 with ``window_s`` 6 admits 60 per 6 s).
    TPM reserves the prompt estimate + ``max_tokens`` (``default_max_tokens`` when absent)
    before the call and settles with the engine's ``usage`` after it."""

    window_s: float = Field(default=60.0, gt=0, le=3600)
    default_max_tokens: int = Field(default=1024, gt=0)
    # Fair share when Redis is down: each replica enforces limit / replicas locally. The
    # live count comes from the replicas' heartbeats in Redis; this is the count used
    # before any heartbeat was seen.
    replicas: int = Field(default=1, ge=1)


class RedisSettings(_Section):
    """The client of ``redis_url``: every call on the request path is bounded by
    ``timeout_s`` (Redis itself answers in ~0.1 ms on loopback; the bound also absorbs this
    process's event-loop lag under load, see :mod:`gateway.redislink`); once Redis is seen
    down (a refused connection, or three timeouts in a row) no request waits on it at all
    (local fallbacks) and it is probed every ``retry_s``. ``key_prefix`` namespaces every key
    this gateway writes; with a Redis Cluster URL it becomes one hash tag
    (``{switchyard}:...``), so all of the gateway's keys share one slot, hence one shard.
    The same bounds hold for one server, a Sentinel-managed master and a Cluster
    (``max_connections`` per server)."""

    timeout_s: float = Field(default=0.25, gt=0, le=5)
    retry_s: float = Field(default=1.0, gt=0)
    max_connections: int = Field(default=16, gt=0)
    key_prefix: str = "switchyard:"
    # Shared routing state (in-flight counts, prefix index, VTC) is exchanged this often;
    # it is also the staleness replicas see of each other's routing.
    sync_interval_s: float = Field(default=0.05, gt=0)
    # API keys created through the admin API are re-read this often (revocation delay).
    keys_refresh_s: float = Field(default=1.0, gt=0)


class AdmissionSettings(_Section):
    """Concurrency caps with a bounded priority wait queue instead of an instant 503.
    ``max_per_engine`` caps the gateway's requests in flight on one engine (across replicas
    when Redis shares the counts; None = no cap); ``max_in_flight`` caps the attempts this
    process has in flight on engines (None = no cap). A request that finds no room waits up
    to ``queue_timeout_s`` in a queue of at most ``queue_size`` (0: shed at once), higher
    priority first (its key's or tenant's), then gets 503 with retry-after
    (:mod:`gateway.admission`)."""

    max_per_engine: int | None = Field(default=None, gt=0)
    max_in_flight: int | None = Field(default=None, gt=0)
    queue_size: int = Field(default=1024, ge=0)
    queue_timeout_s: float = Field(default=10.0, ge=0)


class OutlierSettings(_Section):
    """Passive outlier ejection, the retry budget and slow engines (:mod:`gateway.outliers`).
    An engine is ejected for ``base_ejection_s * 2**(n-1)`` (capped at ``max_ejection_s``)
    after ``consecutive_failures`` failed attempts in a row; ``n`` counts its recent
    ejections and decays by one per ``max_ejection_s`` readmitted."""

    consecutive_failures: int = Field(default=5, ge=1)
    base_ejection_s: float = Field(default=5.0, gt=0)
    max_ejection_s: float = Field(default=300.0, gt=0)
    # Never eject more than this share of the engines, rounded down (the rest keep serving).
    max_ejected_fraction: float = Field(default=0.5, ge=0, le=1)
    # Retries are allowed while they stay under ratio x requests of the last window_s
    # (plus retry_budget_min_per_s x window_s, so a quiet gateway may still retry).
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    retry_budget_min_per_s: float = Field(default=1.0, ge=0)
    retry_budget_window_s: float = Field(default=10.0, gt=0)
    # An engine whose TTFT EWMA exceeds slow_factor x the median of its peers (healthy
    # engines serving a model it serves, each with slow_min_samples TTFT samples) is slow,
    # judged every slow_check_s; after slow_hold_s slow it gets a trial (fresh samples).
    slow_factor: float = Field(default=3.0, gt=1)
    slow_min_samples: int = Field(default=10, ge=1)
    slow_hold_s: float = Field(default=30.0, gt=0)
    slow_check_s: float = Field(default=1.0, gt=0)


class HealthSettings(_Section):
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    fail_threshold: int = Field(default=3, ge=1)
    success_threshold: int = Field(default=2, ge=1)


class DiscoverySettings(_Section):
    """Where the engines come from besides ``engines:`` (:mod:`gateway.discovery`).

    ``static`` (the default): only the ``engines:`` list. ``kubernetes``: also the pods of
    ``namespace`` matching ``selector`` (required: without one every pod of the namespace,
    the gateway's own included, would be taken for an engine), listed then watched with the
    official client; ``engines:`` may list more (discovery never touches those). A pod
    serves on ``{scheme}://{podIP}:{port}``, the port from its annotation
    ``port_annotation`` else ``default_port``, the model from its label ``model_label``.
    ``kubeconfig`` unset: the in-cluster service account, else ``~/.kube/config``.
    ``watch_timeout_s``: each watch asks the API server to end it after this long
    (``timeoutSeconds``), then watches again from the last resourceVersion. Every other
    API call is bounded by ``request_timeout_s``. After a failure (an API error, a 410
    Gone, a cut watch) the pods are listed again after a backoff that starts at
    ``backoff_initial_s`` and doubles, with jitter, up to ``backoff_max_s``."""

    kind: Literal["static", "kubernetes"] = "static"
    namespace: str = "default"
    selector: str | None = None
    kubeconfig: Path | None = None
    context: str | None = None  # a kubeconfig context other than its current one
    model_label: str = "switchyard.io/model"
    port_annotation: str = "switchyard.io/port"
    # The pod's KV-event publisher port (vLLM --kv-events-config tcp://*:PORT): subscribed at
    # tcp://{podIP}:PORT for precise prefix routing; absent: no KV events for that pod.
    kv_events_annotation: str = "switchyard.io/kv-events-port"
    default_port: int = Field(default=8000, gt=0, le=65535)
    scheme: Literal["http", "https"] = "http"
    backoff_initial_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    watch_timeout_s: float = Field(default=30.0, ge=1, le=3600)
    request_timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _coherent(self) -> DiscoverySettings:
        if self.kind == "kubernetes" and not (self.selector or "").strip():
            raise ValueError("discovery.selector is required with kind kubernetes")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("discovery.backoff_max_s must be >= backoff_initial_s")
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ValueError(f"discovery.kubeconfig: no file at {self.kubeconfig}")
        return self


class LoraAdapterConfig(_Section):
    """One managed LoRA adapter (:mod:`gateway.adapters`): ``name`` is the model clients ask
    for, ``base_model`` the served model it runs on, ``source`` where the engines read it
    (an absolute path or ``file://`` URL; see ``gateway.adapters.SourceResolver``),
    ``rank`` informational (vLLM's ``--max-lora-rank`` must cover it)."""

    name: str = Field(min_length=1, max_length=256)
    base_model: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1, max_length=4096)
    rank: int | None = Field(default=None, gt=0, le=4096)


class LoraConfigMapSettings(_Section):
    """Adapters read from a Kubernetes ConfigMap (with ``discovery.kind: kubernetes``):
    ``data[key]`` holds a YAML list of ``{name, base_model, source, rank?}``, read again
    every ``refresh_s`` (RBAC: ``get`` on that one ConfigMap)."""

    name: str = Field(min_length=1)
    key: str = "adapters.yaml"
    refresh_s: float = Field(default=10.0, gt=0)


class KvTierSettings(_Section):
    """Tier-aware routing (docs/kvtier.md): the engines share a KV-cache tier in Redis (the
    vLLM connector or ``enginesim --kv-tier``), which writes a size-only *residency* key per
    full prompt block it stored, keyed by this gateway's token-block hash
    (:func:`kvcache.tier.residency_namespace`). With ``enabled``, a request the prefix-cache
    cost model routes has those keys looked up (one pipelined EXISTS, bounded by
    ``lookup_timeout_s``; positives cached ``cache_ttl_s``, the first absent block
    ``miss_ttl_s``; at most ``cache_max_entries``), and blocks the tier holds count as warm
    on every engine at their fetch cost. Only in token mode (``routing.prefix.tokenizer``):
    byte blocks never match an engine's keys. ``redis_url``: the tier's Redis (the URL the
    engines use); unset, the gateway's ``redis_url``. The request's model must be the name the
    engines serve it under (both sides seed the block hashes with it). While Redis is down the
    lookup answers 0 at once (a breaker retried every ``retry_s``): routing as without a tier."""

    enabled: bool = False
    redis_url: str | None = None
    lookup_timeout_s: float = Field(default=0.02, gt=0, le=1)
    retry_s: float = Field(default=1.0, gt=0)
    max_connections: int = Field(default=4, gt=0)
    cache_ttl_s: float = Field(default=2.0, ge=0)
    miss_ttl_s: float = Field(default=0.25, ge=0)
    cache_max_entries: int = Field(default=100_000, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _plain_redis(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
            raise ValueError("kv_tier.redis_url: redis://, rediss://, unix:// or redis+cluster://")
        return value


class LoraSettings(_Section):
    """High-density LoRA (docs/lora.md): the adapter registry (``adapters`` here, the admin
    API, optionally ``configmap``), on-demand loading and the placement controller.

    A request for a registered adapter that no healthy engine holds waits up to
    ``load_timeout_s`` while one engine loads it (``on_demand``); concurrent requests share
    that one load. Each load/unload call to an engine is bounded by ``request_timeout_s``,
    at most ``max_concurrent_ops`` at once. An engine's adapter slots come from its
    ``vllm:lora_requests_info`` ``max_lora`` label, else ``max_loras``; how many adapters an
    engine holds (vLLM's CPU LoRA cache, ``--max-cpu-loras``, not exported) is
    ``max_cpu_loras`` (unset: its ``max_lora``, vLLM's default). The controller runs
    every ``placement_interval_s`` (0: off); ``placement`` overrides
    :class:`routing.lora.PlacementSettings` fields; ``rate_alpha`` is the EWMA weight of
    one interval's request rate. ``retry_after_s``: the ``retry-after`` of a 503 when no
    engine has a free slot. ``max_adapters`` bounds the registry."""

    adapters: tuple[LoraAdapterConfig, ...] = ()
    on_demand: bool = True
    load_timeout_s: float = Field(default=30.0, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_concurrent_ops: int = Field(default=4, gt=0, le=64)
    max_loras: int = Field(default=1, ge=0)
    max_cpu_loras: int | None = Field(default=None, ge=1)
    placement_interval_s: float = Field(default=2.0, ge=0)
    placement: dict[str, Any] = Field(default_factory=dict)
    rate_alpha: float = Field(default=0.3, gt=0, le=1)
    retry_after_s: float = Field(default=2.0, gt=0)
    max_adapters: int = Field(default=10_000, gt=0)
    configmap: LoraConfigMapSettings | None = None

    @model_validator(mode="after")
    def _unique(self) -> LoraSettings:
        names = [a.name for a in self.adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"lora.adapters: duplicate names {dup}")
        if len(names) > self.max_adapters:
            raise ValueError("lora.adapters: more adapters than lora.max_adapters")
        return self

    @field_validator("placement")
    @classmethod
    def _placement(cls, value: dict[str, Any]) -> dict[str, Any]:
        """The overrides typed as :class:`routing.lora.PlacementSettings` declares them
        (``SWITCHYARD_LORA__PLACEMENT__PRELOAD=false`` arrives as the string "false", which
        would be true): coerced, checked, only the keys given kept."""
        known = {f.name for f in dataclasses.fields(PlacementSettings)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"lora.placement: unknown settings {unknown}")
        try:
            typed = TypeAdapter(PlacementSettings).validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"lora.placement: {exc}") from exc
        return {name: getattr(typed, name) for name in value}


class Settings(BaseSettings):
    """Everything configurable, frozen. See the module docstring for sources."""

    model_config = SettingsConfigDict(
        env_prefix="SWITCHYARD_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,  # an error never echoes a secret (redis_url's password)
    )

    server: ServerSettings = ServerSettings()
    proxy: ProxySettings = ProxySettings()
    routing: RoutingSettings = RoutingSettings()
    health: HealthSettings = HealthSettings()
    engines: tuple[EngineConfig, ...] = ()
    discovery: DiscoverySettings = DiscoverySettings()
    # The autoscaler (autoscale/, docs/autoscaling.md): embedded when enabled; the same
    # section configures `switchyard autoscaler --config`.
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    # LoRA adapters: registry, on-demand loading, placement (docs/lora.md).
    lora: LoraSettings = LoraSettings()
    admin_enabled: bool = True
    # Client API keys: plain strings (every model, no limits) or ApiKeyConfig mappings.
    # Empty, with no redis_url key store in use, means no authentication (the local default).
    api_keys: tuple[SecretStr | ApiKeyConfig, ...] = ()
    # The admin API's own key (never a client key). Unset: the admin API is open only when
    # no client keys are configured (the local default), else refused.
    admin_key: SecretStr | None = None
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    limits: LimitSettings = LimitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    outliers: OutlierSettings = OutlierSettings()
    # Replicas share keys, limits and routing state through it; unset: all in memory. One
    # server: redis://[[user]:pw@]host:port/db (rediss://, unix:///path?db=0); Sentinel:
    # redis+sentinel://[[user]:pw@]host:26379[,host:port...]/<service>[/db] (the password is
    # the master's); Cluster: redis+cluster://[[user]:pw@]host:port[,host:port...]
    # (rediss+... for TLS). The three kinds are tested over TCP, not TLS
    # (tests/gateway/test_redis_topologies.py).
    redis_url: str | None = None
    redis: RedisSettings = RedisSettings()
    # The shared KV-cache tier's residency, for tier-aware routing (docs/kvtier.md).
    kv_tier: KvTierSettings = KvTierSettings()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str | None) -> str | None:
        if value:
            parse_redis_url(value)  # a bad URL stops `switchyard serve` (exit 2), named
        return value

    @model_validator(mode="after")
    def _cluster_needs_a_prefix(self) -> Settings:
        if self.redis_url and parse_redis_url(self.redis_url).kind == "cluster":
            if not self.redis.key_prefix.rstrip(":"):
                raise ValueError("redis.key_prefix must not be empty with a Redis Cluster URL")
        return self

    @model_validator(mode="after")
    def _one_actuator(self) -> Settings:
        auto = self.autoscaling
        if auto.enabled and self.server.workers > 1 and not auto.leader_election.enabled:
            # every worker embeds an autoscaler: only a Lease keeps them to one actuator
            raise ValueError("autoscaling with server.workers > 1 needs leader_election")
        if auto.enabled and self.server.workers > 1 and auto.leader_election.identity:
            raise ValueError(
                "leave autoscaling.leader_election.identity unset with "
                "server.workers > 1 (each worker needs its own: host_pid)"
            )
        return self

    @model_validator(mode="after")
    def _kv_tier_needs_redis(self) -> Settings:
        if self.kv_tier.enabled and not (self.kv_tier.redis_url or self.redis_url):
            raise ValueError("kv_tier.enabled needs kv_tier.redis_url (or redis_url)")
        return self

    @model_validator(mode="after")
    def _configmap_needs_kubernetes(self) -> Settings:
        if self.lora.configmap is not None and self.discovery.kind != "kubernetes":
            # it reads with discovery's kubeconfig and namespace
            raise ValueError("lora.configmap needs discovery.kind kubernetes")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = settings_cls.model_config.get("yaml_file")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: Any) -> Settings:
        """Load from an optional YAML file + env + keyword overrides (the CLI calls this once)."""
        if config is None:
            return cls(**overrides)
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")

        class _FromFile(cls):  # type: ignore[valid-type,misc]
            model_config = SettingsConfigDict(**{**cls.model_config, "yaml_file": str(path)})

        loaded = _FromFile(**overrides)
        return cls.model_validate(loaded.model_dump())
