"""Adapters declared in a Kubernetes ConfigMap (``lora.configmap``, with Kubernetes discovery).

The ConfigMap ``lora.configmap.name`` in ``discovery.namespace`` holds, under
``data[lora.configmap.key]``, a YAML list of ``{name, base_model, source, rank?}``. It is
read (``GET``, RBAC ``get`` on that one ConfigMap) at start and every ``refresh_s``; its
entries replace the registry's ``configmap`` entries (:meth:`AdapterRegistry.sync`). A read
that fails, or content that does not parse, changes nothing (the last good list serves) and
is logged; an invalid entry is skipped. A missing ConfigMap (404) means no entries.

An entry removed, or given another ``source`` or ``base_model``, is then handed to
``unload`` (the gateway's :meth:`gateway.lora.LoraManager.unload_everywhere`, the admin
``DELETE``'s path): the engines holding it drop it at once, and a changed entry is loaded
again, from its new registration, by its next request or placement round. Entries
unchanged, or with only another ``rank``, are left where they are. The next read waits for
those unloads (each bounded by ``lora.request_timeout_s``).

The official client is synchronous: the call runs in a worker thread, bounded by
``discovery.request_timeout_s``, built lazily from the same kubeconfig discovery uses.

Example::

    source = ConfigMapAdapters(settings.lora.configmap, settings.discovery, registry,
                               unload=partial(lora.unload_everywhere, reason="configmap"))
    await source.refresh()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
import yaml
from pydantic import ValidationError

from autoscale.kube import kube_configuration
from gateway.adapters import AdapterRegistry, AdapterSpec, Origin
from gateway.settings import DiscoverySettings, LoraAdapterConfig, LoraConfigMapSettings

__all__ = ["ConfigMapAdapters", "parse_adapters"]

log = logging.getLogger(__name__)


def parse_adapters(text: str) -> list[AdapterSpec]:
    """The ConfigMap's YAML list as specs (``ValueError`` when it is not a list; invalid
    entries are skipped, with a warning)."""
    doc = yaml.safe_load(text) if text.strip() else []
    if not isinstance(doc, list):
        raise ValueError("the adapters ConfigMap entry is not a YAML list")
    out = []
    for item in doc:
        try:
            out.append(AdapterSpec.from_config(LoraAdapterConfig.model_validate(item),
                                               Origin.CONFIGMAP))  # fmt: skip
        except ValidationError as exc:
            log.warning("skipping an invalid adapter in the ConfigMap: %s", exc.errors()[0])
    return out


def _moved(old: AdapterSpec, new: AdapterSpec | None) -> bool:
    """Whether a loaded ``old`` is no longer ``new``: another source or base model."""
    return new is None or (old.source, old.base_model) != (new.source, new.base_model)


class ConfigMapAdapters:
    """Reads the ConfigMap into the registry (see the module docstring)."""

    def __init__(
        self,
        settings: LoraConfigMapSettings,
        discovery: DiscoverySettings,
        registry: AdapterRegistry,
        *,
        unload: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self._settings = settings
        self._discovery = discovery
        self._registry = registry
        self._unload = unload
        self._core: Any = None
        self._api: Any = None
        self._limiter = anyio.CapacityLimiter(1)
        self._io = threading.Lock()  # guards the two below (reading threads and close())
        self._in_flight = 0
        self._closed = False
        self.reads = 0
        self.errors = 0

    async def run(self) -> None:
        """Refresh at once, then every ``refresh_s``, forever (a supervised task)."""
        while True:
            await self.refresh()
            await anyio.sleep(self._settings.refresh_s)

    async def refresh(self) -> bool:
        """Read the ConfigMap and sync the registry; False when the read failed."""
        try:
            text = await anyio.to_thread.run_sync(
                self._read, abandon_on_cancel=True, limiter=self._limiter
            )
            specs = parse_adapters(text)
        except Exception as exc:  # any API, transport or parse failure: keep the last list
            self.errors += 1
            log.warning("cannot read adapters from ConfigMap %s: %s", self._settings.name, exc)
            return False
        self.reads += 1
        before = {s.name: s for s in self._registry if s.origin is Origin.CONFIGMAP}
        changed, removed = self._registry.sync(Origin.CONFIGMAP, specs)
        if changed or removed:
            log.info("adapters from ConfigMap %s: %d added or changed, %d removed",
                     self._settings.name, len(changed), len(removed))  # fmt: skip
        # What engines hold of these is no longer what is registered: gone, or another
        # source or base model (a changed rank alone changes nothing loaded).
        get = self._registry.get
        stale = removed + [n for n in changed if n in before and _moved(before[n], get(n))]
        if self._unload is not None:
            for name in stale:
                log.info("adapter %s left ConfigMap %s or changed there: unloading it",
                         name, self._settings.name)  # fmt: skip
                await self._unload(name)
        return True

    def _read(self) -> str:
        """The ConfigMap's entry, in a worker thread. A read cancelled (shutdown) goes on in
        its thread: a :meth:`close` meanwhile leaves the client to that read, which closes it
        when it ends (closed under it, the client would open a new connection pool that
        nothing closes); no read starts once closed."""
        with self._io:
            if self._closed:
                raise RuntimeError("the ConfigMap reader is closed")
            self._in_flight += 1
        try:
            return self._get()
        finally:
            with self._io:
                self._in_flight -= 1
                last = self._closed and self._in_flight == 0
            if last:
                self._close_client()

    def _get(self) -> str:
        from kubernetes.client.exceptions import ApiException

        d = self._discovery
        try:
            resp = self._client().read_namespaced_config_map(
                self._settings.name, d.namespace, _preload_content=False,
                _request_timeout=d.request_timeout_s,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return ""
            raise
        try:
            body = orjson.loads(resp.data)
        finally:
            resp.release_conn()
        data = body.get("data") if isinstance(body, dict) else None
        value = data.get(self._settings.key) if isinstance(data, dict) else None
        return value if isinstance(value, str) else ""

    def _client(self) -> Any:
        if self._core is None:
            from kubernetes import client

            d = self._discovery  # a config that does not load: KubeError, logged by the caller
            self._api = client.ApiClient(kube_configuration(d.kubeconfig, context=d.context))
            self._core = client.CoreV1Api(self._api)
        return self._core

    def close(self) -> None:
        with self._io:
            self._closed = True
            if self._in_flight:
                return  # the read in flight closes the client when it ends (:meth:`_read`)
        self._close_client()

    def _close_client(self) -> None:
        if self._api is not None:
            self._api.close()
