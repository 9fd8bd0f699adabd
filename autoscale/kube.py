"""The autoscaler's Kubernetes calls: the ``scale`` subresource, pods by selector, raw JSON.

The official ``kubernetes`` client does the transport (kubeconfig or in-cluster auth, TLS,
token refresh); :class:`KubeApi` keeps payloads as JSON mappings and one generic path per
call, so any resource with a ``scale`` subresource works (Deployments, StatefulSets,
ReplicaSets, custom resources such as a LeaderWorkerSet), not just the ones the client has
typed methods for. The client is synchronous (urllib3): every call runs in a worker thread
(:func:`anyio.to_thread.run_sync`, at most ``max_concurrency`` at a time) with a whole-call
``_request_timeout``, no urllib3 retries (the callers' loops retry, with backoff), and is
abandoned, never awaited, on cancellation.

Errors are mapped once, in :meth:`KubeApi._call`::

    KubeError
    ├── KubeUnavailable   refused/reset connection, timeout, 5xx, 429
    ├── KubeConflict      409: a stale resourceVersion or AlreadyExists (lost a race)
    ├── KubeNotFound      404
    └── KubeRejected      any other 4xx (401, 403, 422, ...)

Example::

    api = KubeApi.from_kubeconfig(Path("kubeconfig"))
    scales = ScaleClient(api, ScaleTarget(name="llama", namespace="default"))
    scale = await scales.get()
    await scales.patch_replicas(scale.spec_replicas + 1)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import urllib3

if TYPE_CHECKING:  # imported where a client is made: ~120 ms and ~13 MB a gateway without
    # Kubernetes (static engines, no autoscaler) should not pay at start
    from kubernetes.client import ApiClient, Configuration

__all__ = [
    "KubeApi",
    "KubeConflict",
    "KubeError",
    "KubeNotFound",
    "KubeRejected",
    "KubeUnavailable",
    "PodInfo",
    "Scale",
    "ScaleClient",
    "ScaleTarget",
    "kube_configuration",
    "list_pods",
]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
MAX_POD_PAGES = 20
"""Pages of :data:`POD_PAGE` pods read per listing (10,000 pods: far beyond one target)."""
POD_PAGE = 500


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeUnavailable(KubeError):
    """No usable answer: connection error, timeout, 5xx or 429 (retry later)."""


class KubeConflict(KubeError):
    """409: the object changed since it was read, or already exists (re-read, then decide)."""


class KubeNotFound(KubeError):
    """404: no such object (or no such resource type on this server)."""


class KubeRejected(KubeError):
    """Another 4xx: bad credentials, missing RBAC, an invalid object."""


def _error_for(status: int, message: str) -> KubeError:
    if status == 409:
        return KubeConflict(message, status=status)
    if status == 404:
        return KubeNotFound(message, status=status)
    if status == 429 or status >= 500:
        return KubeUnavailable(message, status=status)
    return KubeRejected(message, status=status)


def _status_message(data: bytes) -> str:
    """The ``message`` of a ``Status`` body, else the body's start."""
    try:
        body = json.loads(data)
    except ValueError:
        return data[:200].decode("utf-8", "replace")
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:200]
    return data[:200].decode("utf-8", "replace")


def kube_configuration(
    kubeconfig: Path | None = None, *, context: str | None = None
) -> Configuration:
    """The official client's configuration from ``kubeconfig`` (its ``context``, else its
    current one); without one, the in-cluster service account, else the default kubeconfig
    (``~/.kube/config``). Retries off: every caller's loop retries, with backoff and bounded
    calls. Never written back to the file. Raises :class:`KubeError` if none loads. Shared by
    the autoscaler's :class:`KubeApi` and the gateway's discovery and ConfigMap reader."""
    from kubernetes.client import Configuration
    from kubernetes.config import ConfigException, load_incluster_config, load_kube_config

    config = Configuration(retries=0)
    try:
        if kubeconfig is not None:
            load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig),
                context=context,
                client_configuration=config,
                persist_config=False,
            )
        else:
            try:
                load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
            except ConfigException:
                load_kube_config(  # type: ignore[no-untyped-call]
                    context=context, client_configuration=config, persist_config=False
                )
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        raise KubeError(f"no usable Kubernetes configuration: {exc}") from exc
    return config


class KubeApi:
    """JSON calls on one ``kubernetes.client.ApiClient``; see the module docstring.

    ``timeout_s`` bounds every call unless a call passes its own.
    Example: ``await api.request("GET", "/api/v1/namespaces/default/pods")``.
    """

    def __init__(
        self, client: ApiClient, *, timeout_s: float = 5.0, max_concurrency: int = 4
    ) -> None:
        self._client = client
        self.timeout_s = timeout_s
        self._limiter = anyio.CapacityLimiter(max_concurrency)

    @classmethod
    def from_kubeconfig(
        cls,
        kubeconfig: Path | None = None,
        *,
        context: str | None = None,
        timeout_s: float = 5.0,
        user_agent: str = "switchyard-autoscaler",
    ) -> KubeApi:
        """A client from ``kubeconfig``; without one, the in-cluster service account, else
        the default kubeconfig (``~/.kube/config``). Raises :class:`KubeError` if none loads."""
        from kubernetes.client import ApiClient

        client = ApiClient(configuration=kube_configuration(kubeconfig, context=context))
        client.user_agent = user_agent
        return cls(client, timeout_s=timeout_s)

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One call; the decoded JSON object answered. Raises :class:`KubeError`."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise KubeUnavailable(f"{method} {path}: no time left for the call")
        call = partial(self._call, method, path, query, body, content_type, timeout)
        return await anyio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)

    def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        content_type: str,
        timeout: float,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        what = f"{method} {path}"
        try:
            verb, url, headers, data, post = self._client.param_serialize(
                method=method,
                resource_path=path,
                query_params=list((query or {}).items()) or None,
                header_params=headers,
                body=dict(body) if body is not None else None,
                auth_settings=["BearerToken"],
            )
            response = self._client.call_api(
                verb, url, header_params=headers, body=data, post_params=post,
                _request_timeout=timeout,
            )  # fmt: skip
            raw: bytes = response.read() or b""  # type: ignore[no-untyped-call]
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        status = int(response.status)
        if not 200 <= status < 300:
            raise _error_for(status, f"{what}: {status} {_status_message(raw)}")
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise KubeUnavailable(f"{what}: answer is not JSON") from exc
        if not isinstance(decoded, dict):
            raise KubeUnavailable(f"{what}: answer is not a JSON object")
        return decoded


@dataclass(frozen=True, slots=True)
class ScaleTarget:
    """A resource with a ``scale`` subresource.

    Example: ``ScaleTarget(name="llama", namespace="prod")`` (a Deployment);
    ``ScaleTarget(name="db", api_version="apps/v1", resource="statefulsets")``.
    """

    name: str
    namespace: str = "default"
    api_version: str = "apps/v1"
    resource: str = "deployments"

    @property
    def path(self) -> str:
        """``/apis/{group}/{version}/namespaces/{ns}/{resource}/{name}/scale`` (``/api/v1``
        for the core group)."""
        group, _, version = self.api_version.rpartition("/")
        base = f"/apis/{group}/{version}" if group else f"/api/{version}"
        ns, name = quote(self.namespace, safe=""), quote(self.name, safe="")
        return f"{base}/namespaces/{ns}/{self.resource}/{name}/scale"

    def __str__(self) -> str:
        return f"{self.resource}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Scale:
    """An ``autoscaling/v1`` Scale: ``Scale(spec_replicas=3, status_replicas=2, selector="app=x")``.

    ``selector`` is ``status.selector``, the label selector of the target's pods (string
    form); ``None`` when the server sent none (a custom resource may not)."""

    spec_replicas: int
    status_replicas: int
    selector: str | None = None
    resource_version: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Scale:
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        meta = body.get("metadata") or {}
        selector = status.get("selector")
        return cls(
            spec_replicas=int(spec.get("replicas") or 0),
            status_replicas=int(status.get("replicas") or 0),
            selector=selector if isinstance(selector, str) and selector else None,
            resource_version=meta.get("resourceVersion"),
        )


class ScaleClient:
    """Get and patch one target's scale. Example: ``await ScaleClient(api, t).get()``."""

    def __init__(self, api: KubeApi, target: ScaleTarget) -> None:
        self.api = api
        self.target = target

    async def get(self, *, timeout_s: float | None = None) -> Scale:
        body = await self.api.request("GET", self.target.path, timeout_s=timeout_s)
        return Scale.from_json(body)

    async def patch_replicas(self, replicas: int, *, timeout_s: float | None = None) -> Scale:
        """Set ``spec.replicas`` (a JSON merge patch: nothing else of the object changes)."""
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        body = await self.api.request(
            "PATCH",
            self.target.path,
            body={"spec": {"replicas": replicas}},
            content_type=MERGE_PATCH,
            timeout_s=timeout_s,
        )
        return Scale.from_json(body)


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the autoscaler reads of a pod: ``PodInfo(name="llama-0", ip="10.0.0.5", ready=True)``.

    ``ready``: the ``Ready`` condition is True and the pod is not being deleted."""

    name: str
    ip: str | None
    ready: bool
    terminating: bool = False
    annotations: Mapping[str, str] | None = None

    @classmethod
    def from_json(cls, pod: Mapping[str, Any]) -> PodInfo:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        terminating = meta.get("deletionTimestamp") is not None
        conditions = status.get("conditions") or []
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in conditions
            if isinstance(c, dict)
        )
        annotations = meta.get("annotations") or {}
        return cls(
            name=str(meta.get("name", "")),
            ip=status.get("podIP") or None,
            ready=ready and not terminating,
            terminating=terminating,
            annotations={str(k): str(v) for k, v in annotations.items()},
        )

    def port(self, annotation: str, default: int) -> int:
        """The engine's port: the pod's ``annotation`` when it holds a port, else ``default``."""
        value = (self.annotations or {}).get(annotation)
        if value is not None and value.isdigit() and 0 < int(value) < 65536:
            return int(value)
        return default


async def list_pods(
    api: KubeApi, namespace: str, selector: str, *, timeout_s: float | None = None
) -> list[PodInfo]:
    """The pods matching ``selector`` in ``namespace`` (paged, at most ``MAX_POD_PAGES``)."""
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"
    pods: list[PodInfo] = []
    token: str | None = None
    for _ in range(MAX_POD_PAGES):
        query = {"labelSelector": selector, "limit": str(POD_PAGE)}
        if token:
            query["continue"] = token
        body = await api.request("GET", path, query=query, timeout_s=timeout_s)
        items = body.get("items") or []
        pods.extend(PodInfo.from_json(item) for item in items if isinstance(item, dict))
        token = (body.get("metadata") or {}).get("continue") or None
        if not token:
            return pods
    log.warning("pods of %s in %s: more than %d pages, the rest ignored", selector,
                namespace, MAX_POD_PAGES)  # fmt: skip
    return pods
