"""The Redis side of :mod:`gateway.ratelimit`: one Lua script that decides a whole batch.

Each rule is two keys under one hash tag (``<prefix>{rl}:z:<scope>:<kind>:<ident>``, a ZSET
of entries scored by Redis server time in ms with members ``<seq>:<amount>``, and
``<prefix>{rl}:n:...``, their running sum), so the multi-key script stays valid on Redis
Cluster (every rate-limit key lives in one slot; Cluster itself is untested). Time is
``redis.call('TIME')``, never a replica's clock.

One call carries a batch: first settlements (replace a reservation's amount with the real
usage), then acquire items in order, each all or nothing over its rules, exactly as
:class:`gateway.ratelimit_local.LocalWindows` decides them in process. Every write refreshes
``PEXPIRE window + 1 s`` on both keys, so idle rules vanish.

Arguments (``r`` is a rule's 1-based slot: ``KEYS[2r-1]`` its ZSET, ``KEYS[2r]`` its sum).
The batch travels as two space-separated strings, not one argument per field: redis-py
spends ~0.5 us of CPU encoding each argument, ~5 us per request with one per field::

    ARGV[1] = window_ms
    ARGV[2] = settlements: (r old_member new_member) ...   new_member "-" = remove
    ARGV[3] = items: (seq n_rules (r limit amount) x n_rules) ...

It returns one row per item (rows separated by ``;``), ``status, n_rules x (used,
reset_ms, retry_ms)`` as space-separated integers with the codes of
:mod:`gateway.ratelimit_local`: one bulk string for the whole batch (:func:`parse_rows`),
because redis-py's RESP parser costs ~4 us of CPU per array element (~50 us per request of
four rules as nested arrays, measured).

Example::

    result = await run_script(client, keys, args)
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

__all__ = ["SCRIPT", "SCRIPT_SHA", "run_script"]

SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local cutoff = now - window
local used, dirty = {}, {}

local function words(s)
  local t, n = {}, 0
  for w in string.gmatch(s, '%S+') do
    n = n + 1
    t[n] = w
  end
  return t
end

local function amount(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

local function load(r)
  local u = used[r]
  if u then return u end
  local z = KEYS[2 * r - 1]
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  local raw = redis.call('GET', KEYS[2 * r])
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
    dirty[r] = true
  end
  if raw then
    u = tonumber(raw)
    for _, m in ipairs(gone) do u = u - amount(m) end
    if u < 0 then u = 0 end
  else
    u = 0
    for _, m in ipairs(redis.call('ZRANGE', z, 0, -1)) do u = u + amount(m) end
    if u > 0 then dirty[r] = true end
  end
  used[r] = u
  return u
end

local function retry_after(z, need)
  local start, freed = 0, 0
  while true do
    local page = redis.call('ZRANGE', z, start, start + 127, 'WITHSCORES')
    if #page == 0 then return window end
    for k = 1, #page, 2 do
      freed = freed + amount(page[k])
      if freed >= need then return math.max(1, tonumber(page[k + 1]) + window - now) end
    end
    start = start + 128
  end
end

local function reset_after(z)
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if #last == 0 then return 0 end
  return math.max(0, tonumber(last[2]) + window - now)
end

local S = words(ARGV[2])
for i = 1, #S - 2, 3 do
  local r, old, new = tonumber(S[i]), S[i + 1], S[i + 2]
  local u = load(r)
  local z = KEYS[2 * r - 1]
  local score = redis.call('ZSCORE', z, old)
  if score then
    redis.call('ZREM', z, old)
    u = u - amount(old)
    if new ~= '-' then
      redis.call('ZADD', z, score, new)
      u = u + amount(new)
    end
    if u < 0 then u = 0 end
    used[r] = u
    dirty[r] = true
  end
end

local A = words(ARGV[3])
local out = {}
local i = 1
while i <= #A do
  local seq, nr = A[i], tonumber(A[i + 1])
  i = i + 2
  local status = 1
  local res = {0}
  for j = 0, nr - 1 do
    local p = i + 3 * j
    local r, limit, amt = tonumber(A[p]), tonumber(A[p + 1]), tonumber(A[p + 2])
    local u = load(r)
    local retry = -1
    if amt > limit then
      retry = -2
      status = -1
    elseif u + amt > limit then
      retry = retry_after(KEYS[2 * r - 1], u + amt - limit)
      if status == 1 then status = 0 end
    end
    res[2 + 3 * j] = u
    res[3 + 3 * j] = 0
    res[4 + 3 * j] = retry
  end
  for j = 0, nr - 1 do
    local p = i + 3 * j
    local r = tonumber(A[p])
    local z = KEYS[2 * r - 1]
    if status == 1 then
      local amt = tonumber(A[p + 2])
      redis.call('ZADD', z, now, seq .. ':' .. A[p + 2])
      used[r] = used[r] + amt
      dirty[r] = true
      res[2 + 3 * j] = used[r]
      res[3 + 3 * j] = window
    else
      res[3 + 3 * j] = reset_after(z)
    end
  end
  res[1] = status
  for k = 1, #res do res[k] = string.format('%d', res[k]) end
  out[#out + 1] = table.concat(res, ' ')
  i = i + 3 * nr
end

for r, _ in pairs(dirty) do
  if used[r] > 0 then
    redis.call('SET', KEYS[2 * r], used[r], 'PX', window + 1000)
    redis.call('PEXPIRE', KEYS[2 * r - 1], window + 1000)
  else
    redis.call('DEL', KEYS[2 * r])
  end
end
return table.concat(out, ';')
"""

SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 (Redis names scripts so)


def parse_rows(reply: bytes | str) -> list[list[int]]:
    """The script's reply: one row of integers per item of the batch."""
    text = reply.encode() if isinstance(reply, str) else reply
    return [[int(v) for v in row.split()] for row in text.split(b";")] if text else []


async def run_script(client: aioredis.Redis, keys: list[str], args: list[str | int]) -> Any:
    """``EVALSHA`` the script, loading it with ``EVAL`` when this server does not know it
    (first call, restart, failover): one round trip in the common case, two once."""
    # redis-py types the arguments as str and the result as sync-or-async; ints go as well.
    evalsha = cast(Callable[..., Awaitable[Any]], client.evalsha)
    try:
        return await evalsha(SCRIPT_SHA, len(keys), *keys, *args)
    except NoScriptError:
        eval_ = cast(Callable[..., Awaitable[Any]], client.eval)
        return await eval_(SCRIPT, len(keys), *keys, *args)
