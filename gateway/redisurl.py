"""``redis_url`` parsed and checked: one server, a Sentinel-managed master, or a Cluster.

A leaf (standard library only): :mod:`gateway.settings` validates the URL with it, so a bad
URL stops ``switchyard serve`` at startup with the reason, and :mod:`gateway.redislink`
builds its client from the parsed form. Accepted:

- ``redis://``, ``rediss://`` (TLS), ``unix://``: one server, handed to redis-py's own
  ``Redis.from_url`` as is (only the scheme and the port are checked here);
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` (and
  ``rediss+sentinel://``, TLS to the sentinels and the master): the master the sentinels
  name for ``service`` (port 26379 by default);
- ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0]`` (and
  ``rediss+cluster://``): a Redis Cluster found from these startup nodes (port 6379 by
  default; a cluster has only db 0).

Sentinel and Cluster URLs take no query string. The password is percent-decoded.

Example::

    target = parse_redis_url("redis+sentinel://:pw@10.0.0.1,10.0.0.2:26380/mymaster/1")
    target.kind, target.hosts, target.service, target.db   # "sentinel", (...), "mymaster", 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

__all__ = ["RedisTarget", "parse_redis_url"]

Kind = Literal["single", "sentinel", "cluster"]

SINGLE_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORTS: dict[Kind, int] = {"sentinel": 26379, "cluster": 6379}
MAX_HOSTS = 64  # a URL lists a few seed nodes, never a fleet


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What ``redis_url`` names. ``hosts``, ``service``, ``db``, ``username`` and
    ``password`` are filled for Sentinel and Cluster URLs (a single server's URL goes to
    redis-py whole)."""

    kind: Kind
    tls: bool = False
    hosts: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``url``; ``ValueError`` naming the problem when it is not one of the forms in
    the module docstring."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"redis_url must look like redis://host:port/db, got {_shown(url)!r}")
    if scheme in SINGLE_SCHEMES:
        try:
            urlsplit(url).port  # noqa: B018 (raises on a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"redis_url has a bad port: {exc}") from None
        return RedisTarget("single", tls=scheme == "rediss")
    base, plus, kind = scheme.partition("+")
    if not plus or base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(
            f"redis_url scheme {scheme!r} is not supported: use redis://, rediss://, unix://, "
            "redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"
        )
    return _parse_multi("sentinel" if kind == "sentinel" else "cluster", rest, tls=base == "rediss")


def _parse_multi(kind: Kind, rest: str, *, tls: bool) -> RedisTarget:
    if "?" in rest or "#" in rest:
        raise ValueError(f"a {kind} redis_url takes no query string or fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None  # as redis-py reads it: a lone name is a user
        password = unquote(secret) if colon else None
    hosts = tuple(_host(part, DEFAULT_PORTS[kind]) for part in hostlist.split(",") if part)
    if not hosts:
        raise ValueError(f"a {kind} redis_url names no host (host:port[,host:port...])")
    if len(hosts) > MAX_HOSTS:
        raise ValueError(f"a {kind} redis_url names more than {MAX_HOSTS} hosts")
    segments = [s for s in path.split("/") if s] if path else []
    service = None
    if kind == "sentinel":
        if not segments:
            raise ValueError(
                "a sentinel redis_url needs the master's service name: "
                "redis+sentinel://host:26379/<service_name>[/<db>]"
            )
        service = unquote(segments.pop(0))
    if len(segments) > 1:
        raise ValueError(f"a {kind} redis_url has too many path segments: /{path}")
    db = _db(segments[0]) if segments else 0
    if kind == "cluster" and db != 0:
        raise ValueError("a Redis Cluster has only db 0: redis+cluster://host:port[,...]")
    return RedisTarget(
        kind, tls=tls, hosts=hosts, service=service, db=db, username=username, password=password
    )


def _host(part: str, default_port: int) -> tuple[str, int]:
    if part.startswith("["):  # [ipv6]:port
        host, bracket, tail = part[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"redis_url has a bad host {part!r}")
        port_text = tail[1:]
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise ValueError(f"redis_url has a host without a name: {part!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"redis_url has a bad port in {part!r}")
    return host, int(port_text)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"redis_url's db must be a number, got {text!r}")
    return int(text)


def _shown(url: str) -> str:
    """``url`` cut short and without anything that may be a password (for error messages)."""
    return url.rpartition("@")[2][:80]
