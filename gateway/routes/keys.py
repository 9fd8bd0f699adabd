"""Admin API for client API keys (behind the admin key, see :mod:`gateway.routes.admin`).

``POST /admin/keys`` ``{name?, models?, adapters?, rpm?, tpm?, user_rpm?, user_tpm?, tenant?,
priority?}`` -> 201 with ``key`` (shown this once) and the key's record; ``GET /admin/keys``
lists every key without secrets (``source``: ``config`` or ``admin``); ``DELETE
/admin/keys/{id}`` revokes; ``POST /admin/keys/{id}/rotate`` -> a new ``key`` for the same id
and settings (the old one stops working). Config keys cannot be revoked or rotated (400).
With ``redis_url`` the change reaches every replica within ``redis.keys_refresh_s``; if Redis
is down the change is refused (503). The admin check runs before the body is read.

Example::

    curl -X POST localhost:8000/admin/keys -H "authorization: Bearer $ADMIN_KEY" \\
         -d '{"name": "ci", "models": ["m"], "rpm": 60}'
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidField, InvalidJSON
from gateway.keys import IssuedKey, KeySpec
from gateway.responses import JSONBytes
from gateway.routes.admin import admin_services

router = APIRouter(prefix="/admin")

_Names = tuple[str, ...] | None


class KeyCreate(BaseModel):
    """The body of ``POST /admin/keys`` (every field optional; omitted = no restriction)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    models: _Names = Field(default=None, max_length=1000)
    adapters: _Names = Field(default=None, max_length=1000)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    user_rpm: int | None = Field(default=None, gt=0)
    user_tpm: int | None = Field(default=None, gt=0)
    tenant: str | None = Field(default=None, max_length=200)
    priority: int | None = Field(default=None, ge=-1000, le=1000)

    def spec(self) -> KeySpec:
        return KeySpec(**self.model_dump())


def _issued(issued: IssuedKey) -> dict[str, Any]:
    return {"key": issued.key, **issued.record.describe()}


async def _spec(request: Request) -> KeySpec:
    raw = await request.body()
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON("the request body is not valid JSON") from exc
    try:
        return KeyCreate.model_validate(data).spec()
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidField(f"{param}: {first['msg']}" if param else first["msg"],
                           param=param) from exc  # fmt: skip


@router.post("/keys")
async def create_key(request: Request) -> JSONBytes:
    services = admin_services(request)
    issued = await services.keys.create(await _spec(request))
    return JSONBytes(_issued(issued), status_code=201)


@router.get("/keys")
async def list_keys(request: Request) -> JSONBytes:
    services = admin_services(request)
    return JSONBytes({"keys": [record.describe() for record in await services.keys.list_keys()]})


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str) -> JSONBytes:
    services = admin_services(request)
    return JSONBytes((await services.keys.revoke(key_id)).describe())


@router.post("/keys/{key_id}/rotate")
async def rotate_key(request: Request, key_id: str) -> JSONBytes:
    services = admin_services(request)
    return JSONBytes(_issued(await services.keys.rotate(key_id)))
