"""Runs the emulated cluster: Deployments -> Pods -> simulated engines.

One reconcile pass (after every pod or Deployment write) does what the Deployment and
ReplicaSet controllers, the garbage collector and the kubelet would:

- a Deployment with fewer active pods (no ``deletionTimestamp``) than ``spec.replicas`` gets new
  pods ``<deployment>-<5 lowercase letters>`` from its template (seeded names); one with more
  loses the excess, not-ready pods first, then the newest (the ReplicaSet controller's order);
- pods whose owner Deployment is gone are deleted (cascading deletion);
- a pod whose annotations name an enginesim profile (``sim.switchyard.io/profile``) gets a
  *runner*: an engine in this process (:func:`enginesim.cluster.start_engine`) on its own port
  (annotation ``switchyard.io/port``, ``status.podIP`` 127.0.0.1). The pod is Ready once the
  engine's simulated cold start is over (its readiness, as a probe of ``/health`` would see it);
- a deleted engine pod gets ``deletionTimestamp`` and Ready False, keeps serving its in-flight
  requests until they finish or ``sim.switchyard.io/drain-s`` simulated seconds pass, then its
  engine stops and the object goes (DELETED event);
- the Deployment's status (replicas, readyReplicas, availableReplicas, updatedReplicas,
  observedGeneration) follows its pods.

Pods without the profile annotation are plain objects: deleted at once, their status whatever
their creator wrote (there is no kubelet) until ``force_ready``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import random
import string
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskGroup

from enginesim.cluster import ClusterConfig, RunningEngine, start_engine
from enginesim.core.profile import EngineProfile, load_profile
from enginesim.kube.errors import ApiError
from enginesim.kube.resources import DEPLOYMENTS, PODS
from enginesim.kube.selectors import SelectorError, format_selector, selector_from_match
from enginesim.kube.store import Event, Obj, Store, rfc3339
from enginesim.server.codec import load_codec
from enginesim.server.runtime import TextCodec

__all__ = [
    "ANNOTATION_COLD_START",
    "ANNOTATION_DRAIN",
    "ANNOTATION_MODEL",
    "ANNOTATION_PORT",
    "ANNOTATION_PROFILE",
    "Controller",
    "ControllerConfig",
    "is_ready",
]

log = logging.getLogger(__name__)

ANNOTATION_PROFILE = "sim.switchyard.io/profile"
ANNOTATION_MODEL = "sim.switchyard.io/model"
ANNOTATION_COLD_START = "sim.switchyard.io/cold-start-s"
ANNOTATION_DRAIN = "sim.switchyard.io/drain-s"
ANNOTATION_KV_TIER = "sim.switchyard.io/kv-tier"  # Redis URL: the engine's --kv-tier
ANNOTATION_KV_TIER_ASYNC = "sim.switchyard.io/kv-tier-async"  # "true": --kv-tier-async
ANNOTATION_PORT = "switchyard.io/port"


MAX_REPLICAS = 256
NAME_ATTEMPTS = 100
POLL_NOT_READY_S = 0.02
POLL_READY_S = 0.1
DRAIN_POLL_S = 0.01

EngineStarter = Callable[..., AbstractAsyncContextManager[RunningEngine]]


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """``speed``: simulated seconds per wall second (engines, cold starts, drains);
    ``drain_s``: simulated drain limit of pods without the drain annotation."""

    speed: float = 1.0
    seed: int = 0
    drain_s: float = 30.0
    engine_log_level: str = "warning"


def _condition(pod: Obj, kind: str) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def is_ready(pod: Obj) -> bool:
    cond = _condition(pod, "Ready")
    return cond is not None and cond.get("status") == "True"


def _set_ready(pod: Obj, ready: bool, now: str) -> None:
    """Ready and ContainersReady conditions, containerStatuses[].ready (in place)."""
    status = pod.setdefault("status", {})
    conds = status.setdefault("conditions", [])
    value = "True" if ready else "False"
    for kind in ("Ready", "ContainersReady"):
        for cond in conds:
            if cond.get("type") == kind:
                if cond.get("status") != value:
                    cond["status"] = value
                    cond["lastTransitionTime"] = now
                break
        else:
            conds.append({"type": kind, "status": value, "lastProbeTime": None,
                          "lastTransitionTime": now})  # fmt: skip
    for cs in status.get("containerStatuses") or []:
        cs["ready"] = ready


def _owner_uid(pod: Obj) -> str | None:
    for ref in pod["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "Deployment" and ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _annotation_float(pod: Obj, key: str) -> float | None:
    raw = (pod["metadata"].get("annotations") or {}).get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def deployment_selector(dep: Obj) -> str:
    """``status.selector`` of the Deployment's Scale: its label selector as a string."""
    spec = dep.get("spec") or {}
    try:
        return format_selector(selector_from_match(spec.get("selector")))
    except SelectorError:
        return ""


@dataclass(eq=False, slots=True)
class _PodRun:
    """One engine pod's runner state."""

    namespace: str
    name: str
    uid: str
    deleting: asyncio.Event = field(default_factory=asyncio.Event)
    forced: bool | None = None
    engine: RunningEngine | None = None
    done: bool = False


class Controller:
    """``await controller.run()`` until cancelled (it stops every engine on the way out)."""

    def __init__(
        self, store: Store, cfg: ControllerConfig, *, starter: EngineStarter = start_engine
    ) -> None:
        self.store = store
        self.cfg = cfg
        self._starter = starter
        self._rng = random.Random(cfg.seed)
        self._dirty = asyncio.Event()
        self._runs: dict[tuple[str, str], _PodRun] = {}
        self._born: dict[tuple[str, str], int] = {}
        self._births = 0
        self._engines = 0
        self._profiles: dict[str, EngineProfile] = {}
        self._codecs: dict[str, TextCodec] = {}
        self._tg: TaskGroup | None = None

    # -- loop ------------------------------------------------------------------------------

    def _on_change(self, ev: Event) -> None:
        if ev.resource in ("pods", "deployments"):
            self._dirty.set()

    async def run(self) -> None:
        self.store.on_change.append(self._on_change)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._dirty.set()
                while True:
                    await self._dirty.wait()
                    self._dirty.clear()
                    try:
                        self.reconcile()
                    except Exception:  # a bug here must not stop the cluster
                        log.exception("kube-sim: reconcile failed")
                        await anyio.sleep(0.1)
        finally:
            self._tg = None
            self.store.on_change.remove(self._on_change)

    def reconcile(self) -> None:
        deployments = list(self.store.items(DEPLOYMENTS))
        uids = {str(d["metadata"]["uid"]) for d in deployments}
        for dep in deployments:
            self._reconcile_deployment(dep)
        for pod in list(self.store.items(PODS)):
            meta = pod["metadata"]
            key = (str(meta["namespace"]), str(meta["name"]))
            if key not in self._born:
                self._births += 1
                self._born[key] = self._births
            owner = _owner_uid(pod)
            deleting = "deletionTimestamp" in meta
            if owner is not None and owner not in uids and not deleting:
                self.delete_pod(*key)
                continue
            annotations = meta.get("annotations") or {}
            if ANNOTATION_PROFILE in annotations and key not in self._runs and not deleting:
                self._start_runner(pod)
        for key in [k for k in self._born if self.store.peek(PODS, *k) is None]:
            del self._born[key]

    # -- Deployments -----------------------------------------------------------------------

    def _reconcile_deployment(self, dep: Obj) -> None:
        meta = dep["metadata"]
        ns, uid = str(meta["namespace"]), str(meta["uid"])
        pods = [p for p in self.store.items(PODS, ns) if _owner_uid(p) == uid]
        active = [p for p in pods if "deletionTimestamp" not in p["metadata"]]
        want = max(0, min(MAX_REPLICAS, int((dep.get("spec") or {}).get("replicas", 1))))
        if len(active) < want:
            for _ in range(want - len(active)):
                active.append(self._create_pod(dep))
        elif len(active) > want:

            def order(p: Obj) -> tuple[bool, int]:
                key = (ns, str(p["metadata"]["name"]))
                return (is_ready(p), -self._born.get(key, 0))

            victims = sorted(active, key=order)[: len(active) - want]
            for p in victims:
                self.delete_pod(ns, str(p["metadata"]["name"]))
            names = {str(p["metadata"]["name"]) for p in victims}
            active = [p for p in active if str(p["metadata"]["name"]) not in names]
        self._update_status(dep, active)

    def _update_status(self, dep: Obj, active: list[Obj]) -> None:
        ready = sum(1 for p in active if is_ready(p))
        status: dict[str, Any] = {
            "observedGeneration": int(dep["metadata"].get("generation", 1)),
            "replicas": len(active),
            "updatedReplicas": len(active),
            "readyReplicas": ready,
            "availableReplicas": ready,
        }
        if len(active) > ready:
            status["unavailableReplicas"] = len(active) - ready
        available = "True" if ready >= int((dep.get("spec") or {}).get("replicas", 1)) else "False"
        old = dep.get("status") or {}
        old_conds = {c.get("type"): c for c in old.get("conditions") or []}
        prev = old_conds.get("Available")
        if prev is not None and prev.get("status") == available:
            cond = prev
        else:
            now = rfc3339(time.time())
            reason = (
                "MinimumReplicasAvailable" if available == "True" else "MinimumReplicasUnavailable"
            )
            cond = {"type": "Available", "status": available, "reason": reason,
                    "message": f"Deployment has {ready} ready replica(s).",
                    "lastUpdateTime": now, "lastTransitionTime": now}  # fmt: skip
        status["conditions"] = [cond]
        if status != old:
            new = copy.deepcopy(dep)
            new["status"] = status
            meta = dep["metadata"]
            self.store.update(DEPLOYMENTS, str(meta["namespace"]), str(meta["name"]), new)

    def _new_name(self, ns: str, base: str) -> str:
        for _ in range(NAME_ATTEMPTS):
            suffix = "".join(self._rng.choice(string.ascii_lowercase) for _ in range(5))
            name = f"{base}-{suffix}"
            if self.store.peek(PODS, ns, name) is None:
                return name
        raise ApiError(500, "InternalError", f"no free pod name for {base}")

    def _create_pod(self, dep: Obj) -> Obj:
        meta = dep["metadata"]
        ns, base = str(meta["namespace"]), str(meta["name"])
        template = copy.deepcopy((dep.get("spec") or {}).get("template") or {})
        tmeta = template.get("metadata") or {}
        spec = template.get("spec") or {}
        spec.setdefault("containers", [{"name": "engine", "image": "enginesim"}])
        spec["nodeName"] = "kube-sim"
        now = rfc3339(time.time())
        pod = {
            "metadata": {
                "name": self._new_name(ns, base),
                "generateName": f"{base}-",
                "labels": dict(tmeta.get("labels") or {}),
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": base,
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },  # fmt: skip
            "spec": spec,
            "status": {
                "phase": "Pending",
                "qosClass": "BestEffort",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "True",
                        "lastProbeTime": None,
                        "lastTransitionTime": now,
                    }
                ],
            },  # fmt: skip
        }
        created = self.store.create(PODS, ns, pod)
        self._births += 1
        self._born[(ns, str(created["metadata"]["name"]))] = self._births
        return created

    # -- pods ------------------------------------------------------------------------------

    def delete_pod(self, namespace: str, name: str) -> Obj:
        """The API's DELETE: engine pods drain first, plain pods go at once."""
        pod = self.store.get(PODS, namespace, name)
        if "deletionTimestamp" in pod["metadata"]:
            return pod
        run = self._runs.get((namespace, name))
        if run is None or run.done:
            return self.store.delete(PODS, namespace, name)
        drain = _annotation_float(pod, ANNOTATION_DRAIN)
        grace = math.ceil(self.cfg.drain_s if drain is None else drain)
        status = copy.deepcopy(pod.get("status") or {})
        holder = {"status": status}
        _set_ready(holder, False, rfc3339(time.time()))
        obj = self.store.mark_deleting(PODS, namespace, name, grace, status=holder["status"])
        run.deleting.set()
        return obj

    def force_ready(self, namespace: str, name: str, ready: bool | None) -> Obj:
        """Force a pod's Ready condition (``None``: back to its engine's own readiness)."""
        pod = self.store.get(PODS, namespace, name)
        run = self._runs.get((namespace, name))
        if run is not None:
            run.forced = ready
            if ready is None:
                return pod
        if ready is None:
            return pod
        return self._write_ready(pod, ready)

    def _write_ready(self, pod: Obj, ready: bool) -> Obj:
        new = copy.deepcopy(pod)
        _set_ready(new, ready, rfc3339(time.time()))
        if ready and new["status"].get("phase") in (None, "Pending"):
            new["status"]["phase"] = "Running"
        meta = pod["metadata"]
        return self.store.update(PODS, str(meta["namespace"]), str(meta["name"]), new)

    def _start_runner(self, pod: Obj) -> None:
        if self._tg is None:
            return
        meta = pod["metadata"]
        run = _PodRun(str(meta["namespace"]), str(meta["name"]), str(meta["uid"]))
        self._runs[(run.namespace, run.name)] = run
        self._engines += 1
        self._tg.start_soon(self._run_pod, run, self._engines)

    def _current(self, run: _PodRun) -> Obj | None:
        """The runner's pod as stored (read-only), None once it is gone or replaced."""
        pod = self.store.peek(PODS, run.namespace, run.name)
        if pod is None or pod["metadata"].get("uid") != run.uid:
            return None
        return pod

    def _engine_config(self, pod: Obj, index: int) -> tuple[ClusterConfig, EngineProfile]:
        annotations = pod["metadata"].get("annotations") or {}
        name = str(annotations[ANNOTATION_PROFILE])
        profile = self._profiles.get(name)
        if profile is None:
            profile = self._profiles[name] = load_profile(name)
        model = annotations.get(ANNOTATION_MODEL)
        cfg = ClusterConfig(
            engines=1,
            base_port=0,
            profile=name,
            speed=self.cfg.speed,
            model=str(model) if model else None,
            seed=self.cfg.seed * 10_007 + index,
            cold_start_s=_annotation_float(pod, ANNOTATION_COLD_START),
            log_level=self.cfg.engine_log_level,
            kv_tier=str(annotations.get(ANNOTATION_KV_TIER) or "") or None,
            kv_tier_async=str(annotations.get(ANNOTATION_KV_TIER_ASYNC, "")).lower() == "true",
        )
        return cfg, profile

    def _codec(self, profile: EngineProfile) -> TextCodec:
        codec = self._codecs.get(profile.name)
        if codec is None:
            codec = self._codecs[profile.name] = load_codec(profile)
        return codec

    async def _run_pod(self, run: _PodRun, index: int) -> None:
        try:
            await self._run_engine(run, index)
        except Exception as exc:  # one pod's failure must not stop the cluster
            log.exception("kube-sim: pod %s/%s runner failed", run.namespace, run.name)
            self._fail(run, f"engine: {exc!r}")
        finally:
            run.done = True
            run.engine = None
            self._runs.pop((run.namespace, run.name), None)
            pod = self._current(run)
            if pod is not None and "deletionTimestamp" in pod["metadata"]:
                self.store.delete(PODS, run.namespace, run.name)

    async def _run_engine(self, run: _PodRun, index: int) -> None:
        pod = self._current(run)
        if pod is None:
            return
        try:
            cfg, profile = self._engine_config(pod, index)
        except (OSError, ValueError) as exc:
            self._fail(run, f"engine config: {exc}")
            return
        try:
            engine_cm = self._starter(cfg, index, profile=profile, codec_factory=self._codec)
            engine = await engine_cm.__aenter__()
        except (OSError, RuntimeError, TimeoutError) as exc:
            self._fail(run, f"engine start: {exc}")
            return
        try:
            run.engine = engine
            self._running(run, engine)
            await self._serve_until_deleted(run, engine)
            await self._drain(run, engine)
        except BaseException as exc:
            if not await engine_cm.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            await engine_cm.__aexit__(None, None, None)

    def _fail(self, run: _PodRun, message: str) -> None:
        log.warning("kube-sim: pod %s/%s failed: %s", run.namespace, run.name, message)
        pod = self._current(run)
        if pod is None:
            return
        new = copy.deepcopy(pod)
        new.setdefault("status", {}).update({"phase": "Failed", "message": message,
                                             "reason": "EngineStartError"})  # fmt: skip
        self.store.update(PODS, run.namespace, run.name, new)

    def _running(self, run: _PodRun, engine: RunningEngine) -> None:
        pod = self._current(run)
        if pod is None:
            return
        new = copy.deepcopy(pod)
        now = rfc3339(time.time())
        port = urlsplit(engine.url).port
        new["metadata"].setdefault("annotations", {})[ANNOTATION_PORT] = str(port)
        containers = (new.get("spec") or {}).get("containers") or [{"name": "engine"}]
        status = new.setdefault("status", {})
        status.update({
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}], "startTime": now,
            "containerStatuses": [{
                "name": str(c.get("name", "engine")), "ready": False, "started": True,
                "restartCount": 0, "image": str(c.get("image", "enginesim")),
                "imageID": "", "containerID": f"kube-sim://{run.uid}-{i}",
                "state": {"running": {"startedAt": now}},
            } for i, c in enumerate(containers)],
        })  # fmt: skip
        conds = status.setdefault("conditions", [])
        if _condition(new, "Initialized") is None:
            conds.insert(0, {"type": "Initialized", "status": "True", "lastProbeTime": None,
                             "lastTransitionTime": now})  # fmt: skip
        _set_ready(new, False, now)
        if "deletionTimestamp" in new["metadata"]:
            run.deleting.set()
        self.store.update(PODS, run.namespace, run.name, new)

    async def _serve_until_deleted(self, run: _PodRun, engine: RunningEngine) -> None:
        rt = engine.runtime
        while not run.deleting.is_set():
            pod = self._current(run)
            if pod is None:
                return
            ready = rt.healthy() if run.forced is None else run.forced
            if ready != is_ready(pod):
                self._write_ready(pod, ready)
            if ready or run.forced is not None:
                wait = POLL_READY_S
            else:
                left = (rt.spec.cold_start_s - rt.driver.now()) / self.cfg.speed
                wait = min(POLL_READY_S, max(POLL_NOT_READY_S, left))
            with anyio.move_on_after(wait):
                await run.deleting.wait()

    async def _drain(self, run: _PodRun, engine: RunningEngine) -> None:
        pod = self._current(run)
        drain = _annotation_float(pod, ANNOTATION_DRAIN) if pod is not None else None
        limit_s = (self.cfg.drain_s if drain is None else drain) / self.cfg.speed
        with anyio.move_on_after(limit_s):
            # the engine's HTTP layer counts in-flight requests without a notification
            while engine.runtime.http_inflight > 0:  # noqa: ASYNC110
                await anyio.sleep(DRAIN_POLL_S)

    # -- introspection ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        pods = []
        for pod in self.store.items(PODS):
            meta = pod["metadata"]
            key = (str(meta["namespace"]), str(meta["name"]))
            run = self._runs.get(key)
            engine = run.engine if run is not None else None
            pods.append({
                "namespace": key[0], "name": key[1], "ready": is_ready(pod),
                "deleting": "deletionTimestamp" in meta,
                "phase": (pod.get("status") or {}).get("phase"),
                "engine": engine.url if engine is not None else None,
                "in_flight": engine.runtime.http_inflight if engine is not None else 0,
                "forced_ready": run.forced if run is not None else None,
            })  # fmt: skip
        deps = []
        for dep in self.store.items(DEPLOYMENTS):
            status = dep.get("status") or {}
            deps.append({
                "namespace": dep["metadata"]["namespace"], "name": dep["metadata"]["name"],
                "replicas": (dep.get("spec") or {}).get("replicas", 1),
                "status_replicas": status.get("replicas", 0),
                "ready_replicas": status.get("readyReplicas", 0),
            })  # fmt: skip
        return {"speed": self.cfg.speed, "engines_running": sum(1 for r in self._runs.values()
                if r.engine is not None), "pods": pods, "deployments": deps}  # fmt: skip
