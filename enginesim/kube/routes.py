"""HTTP: the Kubernetes API paths of the served subset, plus ``/_sim/`` (fault knobs, state).

Paths: ``/version``, ``/healthz``, discovery (``/api``, ``/api/v1``, ``/apis``,
``/apis/<group>``, ``/apis/<group>/<version>``), and for each resource the collection
(``GET`` list or ``?watch=1``, ``POST``), the all-namespaces collection, the object (``GET``,
``PUT``, ``PATCH``, ``DELETE``) and the subresources ``deployments/scale`` (``GET``, ``PUT``,
``PATCH``) and ``status`` (``GET``). Fault knobs apply to every path but ``/_sim/``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from enginesim.kube import resources as rs
from enginesim.kube.controller import Controller, deployment_selector
from enginesim.kube.errors import (
    ApiError,
    bad_request,
    conflict,
    internal_error,
    method_not_allowed,
    not_found,
    unsupported_media_type,
)
from enginesim.kube.faults import FaultError, Faults
from enginesim.kube.patch import PATCH_TYPES, PatchError, apply_patch
from enginesim.kube.selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)
from enginesim.kube.store import Event, Obj, Store, Watcher
from enginesim.kube.tables import table, wants_table

__all__ = ["KubeSim", "build_app"]

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024  # the apiserver's request size limit
DEFAULT_WATCH_S = 1800.0  # the apiserver's --min-request-timeout
MAX_WATCH_S = 3600.0
WRITES = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(slots=True)
class KubeSim:
    """Everything the routes need (one per server; nothing module level)."""

    store: Store
    controller: Controller
    faults: Faults
    address: str = "127.0.0.1:0"


@dataclass(frozen=True, slots=True)
class _Target:
    res: rs.Resource
    namespace: str | None  # None: all namespaces (collection) / cluster-scoped
    name: str | None
    sub: str | None


def _json(body: Any, status: int = 200) -> Response:
    return JSONResponse(body, status_code=status)


def _error(err: ApiError) -> Response:
    return _json(err.status, err.code)


# -- request parsing -------------------------------------------------------------------------


def _target(group: str, version: str, rest: list[str]) -> _Target:
    ns: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        ns, plural, tail = rest[1], rest[2], rest[3:]
    else:
        plural, tail = rest[0], rest[1:]
    res = rs.find_resource(group, version, plural)
    if res is None or len(tail) > 2 or (not res.namespaced and ns is not None):
        raise not_found("", "/".join(rest))
    name = tail[0] if tail else None
    sub = tail[1] if len(tail) > 1 else None
    if res.namespaced and ns is None and name is not None:
        raise not_found("", "/".join(rest))
    return _Target(res, ns, name, sub)


async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, "RequestEntityTooLarge", "request entity too large")
    if not raw:
        raise bad_request("the request has no body")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"invalid JSON body: {exc}") from exc


def _object_body(body: Any, res: rs.Resource) -> Obj:
    if not isinstance(body, dict):
        raise bad_request(f"a {res.kind} is a JSON object")
    meta = body.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise bad_request("metadata is a JSON object")
    return body


def invalid(res: rs.Resource, name: str, message: str) -> ApiError:
    details = {"name": name, "kind": res.kind}
    if res.group:
        details["group"] = res.group
    return ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: {message}', details)


def _selectors(request: Request) -> tuple[LabelSelector, FieldSelector]:
    try:
        return (
            parse_label_selector(request.query_params.get("labelSelector")),
            parse_field_selector(request.query_params.get("fieldSelector")),
        )
    except SelectorError as exc:
        raise bad_request(str(exc)) from exc


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


# -- handlers --------------------------------------------------------------------------------


class Api:
    def __init__(self, sim: KubeSim) -> None:
        self.sim = sim
        self.store = sim.store

    async def handle(self, request: Request) -> Response:
        if request.url.path.startswith("/_sim/"):  # never faulted
            return _error(not_found("", request.url.path))
        faults = self.sim.faults
        if faults.knobs.latency_s > 0:
            await anyio.sleep(faults.knobs.latency_s)
        try:
            if faults.take_error():
                raise internal_error("injected fault (kube-sim error_rate)")
            return await self._dispatch(request)
        except ApiError as err:
            return _error(err)
        except Exception as exc:  # a bug answers like the apiserver's panic handler
            log.exception("kube-sim: %s %s failed", request.method, request.url.path)
            return _error(internal_error(repr(exc)))

    async def _dispatch(self, request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        if request.method != "GET" and (len(parts) < 3 or parts[0] not in ("api", "apis")):
            raise method_not_allowed(f"{request.method} is not supported on this path")
        if parts == ["version"]:
            return _json(rs.version_info())
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return Response("ok", media_type="text/plain")
        if parts == ["api"]:
            return _json(rs.api_versions(self.sim.address))
        if parts == ["apis"]:
            return _json(rs.api_group_list())
        if len(parts) == 2 and parts[0] == "apis":
            group_doc = rs.api_group(parts[1])
            if group_doc is None:
                raise not_found("", request.url.path)
            return _json(group_doc)
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise not_found("", request.url.path)
        if not rest:
            doc = rs.api_resource_list(group, version)
            if doc is None:
                raise not_found("", request.url.path)
            return _json(doc)
        target = _target(group, version, rest)
        if request.method in WRITES and self.sim.faults.take_conflict():
            raise conflict(target.res.plural, target.name or "", target.res.group)
        if target.sub is not None:
            return await self._subresource(request, target)
        if target.name is None:
            return await self._collection(request, target)
        return await self._item(request, target)

    # collections

    async def _collection(self, request: Request, t: _Target) -> Response:
        if request.method == "GET":
            if _truthy(request.query_params.get("watch")):
                return self._watch(request, t)
            return self._list(request, t)
        if request.method == "POST" and (t.namespace is not None or not t.res.namespaced):
            return self._create(t, _object_body(await _body(request), t.res))
        raise method_not_allowed(f"{request.method} is not supported on {t.res.plural}")

    def _list(self, request: Request, t: _Target) -> Response:
        labels, fields = _selectors(request)
        items, rv = self.store.snapshot(t.res, t.namespace)
        items = [
            o for o in items
            if labels.matches(o["metadata"].get("labels")) and fields.matches(o)
        ]  # fmt: skip
        if wants_table(request.headers.get("accept", "")):
            include = request.query_params.get("includeObject", "Metadata")
            return _json(table(t.res, items, rv, include))
        return _json({"kind": t.res.list_kind, "apiVersion": t.res.api_version,
                      "metadata": {"resourceVersion": str(rv)}, "items": items})  # fmt: skip

    def _create(self, t: _Target, body: Obj) -> Response:
        meta = body["metadata"]
        ns = t.namespace or ""
        if t.res.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise bad_request("the namespace of the provided object does not match the "
                                  "namespace sent on the request")  # fmt: skip
            if self.store.find(rs.NAMESPACES, "", ns) is None:
                raise not_found("namespaces", ns)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid(t.res, "", "metadata.name: Required value: name or generateName "
                              "is required")  # fmt: skip
            meta["name"] = self._generated(t.res, ns, str(meta["generateName"]))
        if t.res is rs.DEPLOYMENTS:
            self._default_deployment(body)
        elif t.res is rs.NAMESPACES:
            body["spec"] = {"finalizers": ["kubernetes"]}
            body["status"] = {"phase": "Active"}
        elif t.res is rs.PODS:
            body.setdefault("status", {}).setdefault("phase", "Pending")
        return _json(self.store.create(t.res, ns, body), 201)

    def _generated(self, res: rs.Resource, ns: str, base: str) -> str:
        for i in range(100):
            name = f"{base}{(self.store.resource_version * 7919 + i) % 100000:05d}"
            if self.store.find(res, ns, name) is None:
                return name
        raise internal_error("no free generated name")

    def _default_deployment(self, body: Obj) -> None:
        name = str(body["metadata"]["name"])
        spec = body.setdefault("spec", {})
        if not isinstance(spec, dict):
            raise invalid(rs.DEPLOYMENTS, name, "spec: a JSON object")
        replicas = spec.setdefault("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise invalid(rs.DEPLOYMENTS, name, "spec.replicas: must be >= 0")
        template = spec.setdefault("template", {})
        labels = (template.get("metadata") or {}).get("labels") or {}
        if not spec.get("selector"):
            spec["selector"] = {"matchLabels": dict(labels)}
        body["status"] = {}

    # watch

    def _watch(self, request: Request, t: _Target) -> Response:
        labels, fields = _selectors(request)
        raw_rv = request.query_params.get("resourceVersion", "")
        since: int | None = None
        if raw_rv not in ("", "0"):
            try:
                since = int(raw_rv)
            except ValueError as exc:
                raise bad_request(f"invalid resourceVersion {raw_rv!r}") from exc
        try:
            timeout = float(request.query_params.get("timeoutSeconds") or DEFAULT_WATCH_S)
        except ValueError as exc:
            raise bad_request("invalid timeoutSeconds") from exc
        timeout = min(MAX_WATCH_S, max(0.0, timeout)) if math.isfinite(timeout) else MAX_WATCH_S
        if self.sim.faults.take_gone():
            err = ApiError(410, "Expired", f"too old resource version: {raw_rv or 0} "
                           f"({self.store.resource_version}) (kube-sim gone_watches)")  # fmt: skip
            return _stream(_error_events(err))
        try:
            replay, watcher = self.store.watch(t.res, t.namespace, since)
        except ApiError as err:
            if err.code != 410:
                raise
            return _stream(_error_events(err))
        return _stream(self._events(replay, watcher, labels, fields, timeout))

    async def _events(
        self,
        replay: list[Event],
        watcher: Watcher,
        labels: LabelSelector,
        fields: FieldSelector,
        duration_s: float,
    ) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + duration_s
        try:
            for ev in replay:
                line = _event_line(ev, labels, fields)
                if line is not None:
                    yield line
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                with anyio.move_on_after(left):
                    ev2 = await watcher.queue.get()
                    if ev2 is None:
                        return
                    line = _event_line(ev2, labels, fields)
                    if line is not None:
                        yield line
        finally:
            self.store.unwatch(watcher)

    # items

    async def _item(self, request: Request, t: _Target) -> Response:
        ns, name = t.namespace or "", str(t.name)
        if request.method == "GET":
            obj = self.store.get(t.res, ns, name)
            if wants_table(request.headers.get("accept", "")):
                include = request.query_params.get("includeObject", "Metadata")
                return _json(table(t.res, [obj], self.store.resource_version, include))
            return _json(obj)
        verb = {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(request.method)
        if verb not in t.res.verbs:
            raise method_not_allowed(f"{request.method} is not supported on {t.res.plural}")
        if request.method == "DELETE":
            return await self._delete(request, t.res, ns, name)
        cur = self.store.get(t.res, ns, name)
        body = await _body(request)
        if request.method == "PUT":
            new = _object_body(body, t.res)
            expect = new["metadata"].get("resourceVersion")
        else:
            new = self._patched(request, t.res, cur, body)
            expect = new["metadata"].get("resourceVersion")
            if expect == cur["metadata"].get("resourceVersion"):
                expect = None
        if new["metadata"].get("name") not in (None, name):
            raise bad_request("the name of the object does not match the name on the URL")
        if t.res in (rs.PODS, rs.DEPLOYMENTS):  # status goes through its own writers
            new["status"] = cur.get("status", {})
        if t.res is rs.DEPLOYMENTS:
            replicas = (new.get("spec") or {}).get("replicas", 1)
            if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                raise invalid(t.res, name, "spec.replicas: must be >= 0")
        return _json(self.store.update(t.res, ns, name, new, expect_rv=_rv(expect)))

    def _patched(self, request: Request, res: rs.Resource, cur: Obj, body: Any) -> Obj:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() not in PATCH_TYPES:
            raise unsupported_media_type(ctype)
        try:
            new = apply_patch(cur, body, ctype)
        except PatchError as exc:
            raise invalid(res, str(cur["metadata"]["name"]), str(exc)) from exc
        return _object_body(new, res)

    async def _delete(self, request: Request, res: rs.Resource, ns: str, name: str) -> Response:
        cur = self.store.get(res, ns, name)
        raw = await request.body()
        if raw:
            try:
                options = json.loads(raw)
            except ValueError as exc:
                raise bad_request(f"invalid DeleteOptions: {exc}") from exc
            pre = (options.get("preconditions") or {}) if isinstance(options, dict) else {}
            meta = cur["metadata"]
            for key in ("uid", "resourceVersion"):
                if pre.get(key) and pre[key] != meta.get(key):
                    raise conflict(res.plural, name, res.group)
        if res is rs.PODS:
            return _json(self.sim.controller.delete_pod(ns, name))
        gone = self.store.delete(res, ns, name)
        details = {"name": name, "kind": res.plural, "uid": gone["metadata"].get("uid")}
        if res.group:
            details["group"] = res.group
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Success", "details": details})  # fmt: skip

    # subresources

    async def _subresource(self, request: Request, t: _Target) -> Response:
        ns, name = t.namespace or "", str(t.name)
        if t.sub == "status" and request.method == "GET":
            return _json(self.store.get(t.res, ns, name))
        if t.sub != "scale" or t.res is not rs.DEPLOYMENTS:
            raise not_found("", f"{t.res.plural}/{t.sub}")
        dep = self.store.get(t.res, ns, name)
        if request.method == "GET":
            return _json(_scale(dep))
        if request.method not in ("PUT", "PATCH"):
            raise method_not_allowed(f"{request.method} is not supported on deployments/scale")
        body = await _body(request)
        cur = _scale(dep)
        if request.method == "PUT":
            new = _object_body(body, t.res)
            expect = new["metadata"].get("resourceVersion")
        else:
            new = self._patched(request, t.res, cur, body)
            expect = new["metadata"].get("resourceVersion")
            if expect == cur["metadata"]["resourceVersion"]:
                expect = None
        replicas = (new.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise invalid(t.res, name, "spec.replicas: must be >= 0")
        updated = copy.deepcopy(dep)
        updated["spec"]["replicas"] = replicas
        saved = self.store.update(t.res, ns, name, updated, expect_rv=_rv(expect))
        return _json(_scale(saved))


def _rv(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _scale(dep: Obj) -> Obj:
    meta = dep["metadata"]
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if k in meta
        },  # fmt: skip
        "spec": {"replicas": int((dep.get("spec") or {}).get("replicas", 1))},
        "status": {
            "replicas": int((dep.get("status") or {}).get("replicas", 0)),
            "selector": deployment_selector(dep),
        },
    }


def _event_line(ev: Event, labels: LabelSelector, fields: FieldSelector) -> bytes | None:
    """The event as the watcher sees it through its selectors (an object that starts or
    stops matching is ADDED or DELETED for that watcher, as the apiserver does)."""

    def match(obj: Obj | None) -> bool:
        return (
            obj is not None
            and labels.matches(obj["metadata"].get("labels"))
            and (fields.matches(obj))
        )

    kind = ev.type
    if kind == "MODIFIED":
        now, before = match(ev.obj), match(ev.prev)
        if not now and not before:
            return None
        kind = "MODIFIED" if now and before else ("ADDED" if now else "DELETED")
    elif not match(ev.obj):
        return None
    return json.dumps({"type": kind, "object": ev.obj}, separators=(",", ":")).encode() + b"\n"


async def _error_events(err: ApiError) -> AsyncIterator[bytes]:
    yield json.dumps({"type": "ERROR", "object": err.status}).encode() + b"\n"


def _stream(events: AsyncIterator[bytes]) -> Response:
    return StreamingResponse(
        events, media_type="application/json", headers={"Cache-Control": "no-cache, private"}
    )


# -- /_sim/ ------------------------------------------------------------------------------------


class SimRoutes:
    def __init__(self, sim: KubeSim) -> None:
        self.sim = sim

    async def faults(self, request: Request) -> Response:
        if request.method == "PUT":
            try:
                body = json.loads(await request.body() or b"{}")
                cut = self.sim.faults.update(body)
            except (ValueError, FaultError) as exc:
                return _json({"error": str(exc)}, 400)
            if cut:
                self.sim.store.cut_watches()
        return _json(self.sim.faults.as_dict())

    async def ready(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        ready = body.get("ready") if isinstance(body, dict) else None
        if ready is not None and not isinstance(ready, bool):
            return _json({"error": "ready: true, false or null"}, 400)
        ns, name = request.path_params["ns"], request.path_params["name"]
        try:
            return _json(self.sim.controller.force_ready(ns, name, ready))
        except ApiError as err:
            return _error(err)

    async def state(self, _request: Request) -> Response:
        store = self.sim.store
        return _json({
            "resourceVersion": str(store.resource_version),
            "compacted": str(store.compacted),
            "watches": store.watchers,
            "faults": self.sim.faults.as_dict(),
            **self.sim.controller.state(),
        })  # fmt: skip


def build_app(sim: KubeSim) -> Starlette:
    """The emulator's ASGI app."""
    api = Api(sim)
    simr = SimRoutes(sim)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(
        routes=[
            Route("/_sim/faults", simr.faults, methods=["GET", "PUT"]),
            Route("/_sim/pods/{ns}/{name}/ready", simr.ready, methods=["PUT"]),
            Route("/_sim/state", simr.state, methods=["GET"]),
            Route("/{path:path}", api.handle, methods=methods),
        ]
    )
