"""The limits step of a proxied request: what to reserve, the 429, and the settlement.

Between authentication (:mod:`gateway.keys`) and routing, :func:`admit` turns the caller's
limits into rules (:func:`gateway.ratelimit.rules_for`: per key, per tenant, per ``user``),
reserves one request and the token estimate (prompt estimate + ``max_tokens``, or
``limits.default_max_tokens`` when the request sets none; 0 output for embeddings) in one
atomic limiter call, and answers :class:`gateway.errors.RateLimited` when a rule has no room.
An admitted request carries a :class:`Quota`: the ``x-ratelimit-*`` headers its response
gets, whether the proxy must hide an injected usage chunk, and the :class:`Settlement` the
proxy calls when the request is over, which replaces the reservation with what was used:

* the engine's ``usage`` (``prompt_tokens + completion_tokens``) when it reported one;
* no usage and no engine ever answered (a gateway error, a shed or refused request): 0;
* no usage after an engine answered (a cut stream, a client that left): the prompt estimate
  plus the SSE events relayed (about one per token).

Callers without limits skip all of it: :func:`admit` returns :data:`UNLIMITED` without an
await.

Example::

    quota = await admit(limiter, principal, fields, kind, settings.limits)
    plan = ProxyPlan(..., response_headers=quota.headers, on_finish=quota.settlement)
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import RateLimited
from gateway.exchange import FinishedRequest
from gateway.parsing import Kind, RequestFields
from gateway.principal import Principal
from gateway.ratelimit import RateLimiter, Reservation, rules_for
from gateway.settings import LimitSettings

__all__ = ["UNLIMITED", "Quota", "Settlement", "admit", "used_tokens"]


def used_tokens(record: FinishedRequest) -> int:
    """What a finished request consumed (see the module docstring)."""
    usage = record.usage or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int | None):
        return prompt + (completion or 0)
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    if record.endpoint_id is None:
        return 0
    return record.prompt_tokens_estimate + record.streamed_events


@dataclass(slots=True)
class Settlement:
    """The proxy's ``on_finish`` hook: settles the token reservation once."""

    limiter: RateLimiter
    reservation: Reservation
    done: bool = False

    def finished(self, record: FinishedRequest) -> None:
        self.settle(used_tokens(record))

    def settle(self, tokens: int) -> None:
        if not self.done:
            self.done = True
            self.limiter.settle(self.reservation, tokens=tokens)


@dataclass(frozen=True, slots=True)
class Quota:
    """What an admitted request carries into the proxy."""

    headers: tuple[tuple[bytes, bytes], ...] = ()
    meters_tokens: bool = False
    settlement: Settlement | None = None

    def refund(self) -> None:
        """The request was refused before any engine saw it: its tokens go back (the request
        still counts against RPM). No-op once the proxy has settled it."""
        if self.settlement is not None:
            self.settlement.settle(0)


UNLIMITED = Quota()


def reserve_tokens(fields: RequestFields, kind: Kind, settings: LimitSettings) -> int:
    """Prompt estimate + the most the engine may generate (at least 1)."""
    if kind is Kind.EMBEDDINGS:
        output = 0
    else:
        output = settings.default_max_tokens if fields.max_tokens is None else fields.max_tokens
    return max(1, fields.prompt_tokens_estimate + output)


async def admit(
    limiter: RateLimiter,
    principal: Principal,
    fields: RequestFields,
    kind: Kind,
    settings: LimitSettings,
) -> Quota:
    """Reserve the request's share of every limit that applies, or raise the 429."""
    if not principal.limited:
        return UNLIMITED
    rules = rules_for(principal, fields.user, settings)
    if not rules:
        return UNLIMITED
    verdict = await limiter.acquire(rules, tokens=reserve_tokens(fields, kind, settings))
    if not verdict.allowed:
        raise RateLimited(verdict.message, headers=verdict.headers)
    # An admitted verdict carries only the x-ratelimit-* headers (retry-after and
    # x-should-retry come with denials).
    headers = tuple((name.encode(), value.encode()) for name, value in verdict.headers.items())
    meters = any(rule.kind == "tokens" for rule in rules)
    settlement = (
        Settlement(limiter, verdict.reservation) if verdict.reservation is not None else None
    )
    return Quota(headers=headers, meters_tokens=meters, settlement=settlement)
