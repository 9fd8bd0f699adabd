"""Load: wrk (one process, or one per engine for ``direct``), the 8k-token prompt bodies, and
a one-connection streaming client for TTFT on a reused keep-alive connection.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.overhead.harness import WrkResult, combine_wrk, parse_wrk, split_connections

LUA = Path(__file__).parent / "lua"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Script:
    """A wrk Lua script and its environment (``WRK_*``)."""

    lua: str
    env: tuple[tuple[str, str], ...] = ()


def run_wrk(
    urls: Sequence[str],
    connections: int,
    duration_s: float,
    script: Script,
    *,
    auth: str | None = None,
    threads: int = 2,
) -> WrkResult:
    """``wrk --latency`` against ``urls``: one URL gets ``threads`` threads and all the
    connections; several (direct) get one single-threaded wrk each, connections split evenly."""
    conns = [connections] if len(urls) == 1 else split_connections(connections, len(urls))
    env = {"PATH": "/usr/bin:/bin", **dict(script.env)}
    if auth:
        env["WRK_AUTH"] = auth
    procs = []
    for url, c in zip(urls, conns, strict=False):
        t = max(1, min(threads if len(urls) == 1 else 1, c))
        argv = [WRK, f"-t{t}", f"-c{c}", f"-d{max(1, round(duration_s))}s", "--latency",
                "--timeout", "10s", "-s", str(LUA / script.lua), url + CHAT_PATH]  # fmt: skip
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, text=True))  # fmt: skip
    outs = [p.communicate(timeout=duration_s + 60)[0] for p in procs]
    return combine_wrk([parse_wrk(o) for o in outs])


def write_prompt_bodies(
    path: Path, *, groups: int = 8, per_group: int = 8, chars: int = 32_000, shared: float = 0.75
) -> Path:
    """``groups * per_group`` chat bodies of ~``chars`` characters (~8k tokens) of varied words;
    the first ``shared`` fraction is common to a group (so a prefix-cache router hashes real
    prompts and finds real matches), the rest unique. One JSON body per line."""
    rng = random.Random(1234)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(4000)]  # fmt: skip

    def text(n: int) -> str:
        out: list[str] = []
        size = 0
        while size < n:
            w = rng.choice(vocab)
            out.append(w)
            size += len(w) + 1
        return " ".join(out)

    lines = []
    for g in range(groups):
        prefix = f"group {g}: " + text(int(chars * shared))
        for i in range(per_group):
            content = prefix + f" request {i}: " + text(int(chars * (1 - shared)))
            body = {"model": "fake-model", "messages": [{"role": "user", "content": content}],
                    "max_tokens": 16}  # fmt: skip
            lines.append(json.dumps(body, separators=(",", ":")))
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class StreamCheck:
    ttft_ms: float
    total_ms: float
    content_chunks: int
    done: bool


async def _read_chunked(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 chunk's payload; ``None`` at the last (empty) chunk."""
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
    if size == 0:
        await reader.readuntil(b"\r\n")
        return None
    data = await reader.readexactly(size + 2)
    return data[:-2]


def _has_content(event: bytes) -> bool:
    if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
        return False
    try:
        choices = json.loads(event[6:]).get("choices") or []
    except ValueError:
        return False
    for c in choices:
        delta = c.get("delta") or {}
        if delta.get("content") or c.get("text"):
            return True
    return False


async def stream_on_one_connection(
    url: str, k: int, tokens: int, *, auth: str | None = None, timeout_s: float = 30.0
) -> list[StreamCheck]:
    """``k`` sequential streaming chat requests on ONE keep-alive connection; the time to the
    first content byte and whether each stream ended with ``[DONE]``."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "fake-model",
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "Stream for the TTFT probe."}],
        }
    )
    head = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            + (f"Authorization: {auth}\r\n" if auth else "")
            + f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    reader, writer = await asyncio.open_connection(host, int(port))
    out: list[StreamCheck] = []
    try:
        for _ in range(k):
            t0 = time.perf_counter()
            writer.write(head.encode() + body.encode())
            async with asyncio.timeout(timeout_s):
                headers = await reader.readuntil(b"\r\n\r\n")
                if b"chunked" not in headers.lower():
                    raise RuntimeError(f"not a chunked stream: {headers[:200]!r}")
                ttft = None
                buf, chunks, done = b"", 0, False
                while (data := await _read_chunked(reader)) is not None:
                    buf += data
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        ev = ev.strip()
                        if _has_content(ev):
                            chunks += 1
                            if ttft is None:
                                ttft = (time.perf_counter() - t0) * 1000
                        done = done or ev == b"data: [DONE]"
            total = (time.perf_counter() - t0) * 1000
            out.append(StreamCheck(ttft if ttft is not None else total, total, chunks, done))
    finally:
        writer.close()
    return out


def ttft_probe(url: str, k: int, tokens: int, auth: str | None = None) -> list[StreamCheck]:
    return asyncio.run(stream_on_one_connection(url, k, tokens, auth=auth))
