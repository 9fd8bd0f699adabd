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

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from routing import build_profile, builtin_policies


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


class HealthSettings(_Section):
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    fail_threshold: int = Field(default=3, ge=1)
    success_threshold: int = Field(default=2, ge=1)


class Settings(BaseSettings):
    """Everything configurable, frozen. See the module docstring for sources."""

    model_config = SettingsConfigDict(
        env_prefix="SWITCHYARD_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    server: ServerSettings = ServerSettings()
    proxy: ProxySettings = ProxySettings()
    routing: RoutingSettings = RoutingSettings()
    health: HealthSettings = HealthSettings()
    engines: tuple[EngineConfig, ...] = ()
    admin_enabled: bool = True
    # Client API keys; empty means no authentication (the local default).
    api_keys: tuple[SecretStr, ...] = ()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

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
