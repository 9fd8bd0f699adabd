"""The pure half of :mod:`gateway.ratelimit`: rules, verdicts and OpenAI's headers.

:func:`rules_for` turns a :class:`~gateway.principal.Principal`'s limits into
:class:`LimitRule` s (per-minute limits scaled to the window; users hashed with the key id,
so no raw user id reaches Redis); :func:`rate_headers` and :func:`denial` turn one decision
(from Redis or the local windows) into the ``x-ratelimit-*`` headers, ``retry-after`` and
``retry-after-ms``, ``x-should-retry`` and an OpenAI-like message that names the key id,
never the key.

Example::

    rules = rules_for(principal, "alice", LimitSettings())
    format_duration(1250)  # "1.25s"
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from gateway.errors import retry_after_headers
from gateway.principal import Principal
from gateway.ratelimit_local import FITS, NEVER
from gateway.settings import LimitSettings

__all__ = [
    "LimitRule",
    "Reservation",
    "Verdict",
    "denial",
    "format_duration",
    "held_to",
    "per_window",
    "rate_headers",
    "rules_for",
]

_KIND_TEXT = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)"}


@dataclass(frozen=True, slots=True)
class LimitRule:
    """One limit that applies to a request: ``LimitRule("key", "k_1a2b", "requests", 30)``."""

    scope: str  # "key" | "tenant" | "user"
    ident: str  # key_id / tenant name / hashed (key_id, user)
    kind: str  # "requests" | "tokens"
    limit: int  # per window (already scaled by window_s / 60)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The token entries an admitted request holds until :meth:`RateLimiter.settle`."""

    rules: tuple[LimitRule, ...]  # the token rules charged
    seq: str  # the entries' unique id
    tokens: int  # amount charged to each rule
    local: bool  # charged to the local windows (Redis was down)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The limiter's answer. ``headers`` go on the response whether allowed or not: the
    ``x-ratelimit-*`` set for each kind of limit that applied and, on a denial,
    ``x-should-retry`` plus ``retry-after``/``retry-after-ms`` (left out with
    ``x-should-retry: false``: the request is larger than a whole limit, no wait helps)."""

    allowed: bool
    headers: dict[str, str]
    retry_after_s: float  # 0 when allowed or when waiting cannot help
    should_retry: bool
    message: str
    reservation: Reservation | None  # when allowed and a token rule applied


def per_window(per_minute: int, window_s: float) -> int:
    """``ceil(per_minute * window_s / 60)`` (rounded to 1e-6 first: 600 * 0.1 is not 60)."""
    return math.ceil(round(per_minute * window_s / 60.0, 6))


def rules_for(
    principal: Principal, user: str | None, settings: LimitSettings
) -> tuple[LimitRule, ...]:
    """The rules of a request: the key's ``rpm``/``tpm``, its tenant's, and its ``user``'s
    (hashed with the key id: Redis never sees a raw user id)."""
    if not principal.limited:
        return ()
    base = _principal_rules(principal, settings.window_s)
    if not user or (principal.user_rpm is None and principal.user_tpm is None):
        return base
    w = settings.window_s
    uid = xxhash.xxh64_hexdigest(f"{principal.key_id}\0{user}")
    out = list(base)
    if principal.user_rpm is not None:
        out.append(LimitRule("user", uid, "requests", per_window(principal.user_rpm, w)))
    if principal.user_tpm is not None:
        out.append(LimitRule("user", uid, "tokens", per_window(principal.user_tpm, w)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)  # principals are few and immutable: built once per key
def _principal_rules(principal: Principal, w: float) -> tuple[LimitRule, ...]:
    """The key's and its tenant's rules (the same for every request of that key)."""
    out: list[LimitRule] = []
    kid = principal.key_id
    if principal.rpm is not None:
        out.append(LimitRule("key", kid, "requests", per_window(principal.rpm, w)))
    if principal.tpm is not None:
        out.append(LimitRule("key", kid, "tokens", per_window(principal.tpm, w)))
    if principal.tenant is not None:
        if principal.tenant_rpm is not None:
            rpm = per_window(principal.tenant_rpm, w)
            out.append(LimitRule("tenant", principal.tenant, "requests", rpm))
        if principal.tenant_tpm is not None:
            tpm = per_window(principal.tenant_tpm, w)
            out.append(LimitRule("tenant", principal.tenant, "tokens", tpm))
    return tuple(out)


@functools.lru_cache(maxsize=4096)  # the window's own duration is on most responses
def format_duration(ms: int) -> str:
    """OpenAI's reset format: ``12ms``, ``1s``, ``1.25s``, ``6m0s``."""
    ms = max(0, ms)
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    seconds = f"{ms % 60_000 / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{ms // 60_000}m{seconds}s"


def _scope_text(rule: LimitRule) -> str:
    return "user" if rule.scope == "user" else f"{rule.scope} {rule.ident}"


_HEADER_NAMES = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}",
           f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
}  # fmt: skip


def held_to(rule: LimitRule, share: int) -> int:
    """The limit a rule is enforced at by one of ``share`` replicas (ceil, so >= 1)."""
    return rule.limit if share == 1 else -(-rule.limit // share)


def rate_headers(rules: Sequence[LimitRule], row: Sequence[int], share: int) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``: per kind, the rule
    with the least remaining decides. ``row`` is a decision, flat: ``status`` then
    ``(used, reset_ms, retry_ms)`` per rule (as the Redis script returns it)."""
    least: dict[str, tuple[int, int, int]] = {}  # kind -> (remaining, limit, reset_ms)
    k = 1
    for rule in rules:
        limit = rule.limit if share == 1 else -(-rule.limit // share)
        remaining = limit - row[k]
        best = least.get(rule.kind)
        if best is None or remaining < best[0]:
            least[rule.kind] = (remaining, limit, row[k + 1])
        k += 3
    headers: dict[str, str] = {}
    for kind, (remaining, limit, reset_ms) in least.items():
        limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
        headers[limit_name] = str(limit)
        headers[remaining_name] = str(remaining) if remaining > 0 else "0"
        headers[reset_name] = format_duration(reset_ms)
    return headers


def denial(
    rules: Sequence[LimitRule],
    row: Sequence[int],
    *,
    share: int,
    amount: int,
    window_s: float,
    headers: dict[str, str],
) -> tuple[float, bool, str]:
    """For a denied ``row``: ``(retry_after_s, should_retry, message)``, and the retry
    headers added to ``headers``. The latest blocking rule decides the wait; a rule the
    request can never fit (larger than its whole limit) means no wait helps."""
    per = "" if window_s == 60 else f" per {format_duration(round(window_s * 1000))}"
    blocking: list[tuple[int, LimitRule, int, int, int]] = []
    for j, rule in enumerate(rules):
        used, _, retry = row[1 + 3 * j : 4 + 3 * j]
        if retry != FITS:
            asked = amount if rule.kind == "tokens" else 1
            blocking.append((retry, rule, held_to(rule, share), used, asked))
    never = [b for b in blocking if b[0] == NEVER]
    if never:
        _, rule, limit, _, asked = never[0]
        headers["x-should-retry"] = "false"
        message = (
            f"Request too large for {_KIND_TEXT[rule.kind]} on {_scope_text(rule)}: limit "
            f"{limit}{per}, requested {asked}. Waiting will not help; lower max_tokens or "
            "shorten the prompt."
        )
        return 0.0, False, message
    retry_ms, rule, limit, used, asked = max(blocking, key=lambda b: b[0])
    headers.update(retry_after_headers(retry_ms / 1000.0))
    headers["x-should-retry"] = "true"
    message = (
        f"Rate limit reached for {_KIND_TEXT[rule.kind]} on {_scope_text(rule)}: limit "
        f"{limit}{per}, used {used}, requested {asked}. "
        f"Try again in {format_duration(retry_ms)}."
    )
    return retry_ms / 1000.0, True, message
