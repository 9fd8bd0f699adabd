"""``python -m benchmarks.routing.scrape_cost``: the gateway's CPU per engine scrape, filtered
``/metrics/?name[]=...`` against the whole ``/metrics`` page, side by side in one run.

Runs the gateway's own :class:`gateway.scraper.MetricsScraper` in this process against
engines on 127.0.0.1 (a fresh enginesim cluster by default, or ``--url`` for running
engines such as a real vLLM) and measures this process's CPU time (``time.process_time``,
so other processes on the host do not count) over ``--rounds`` scrape rounds per mode,
alternating the modes in blocks so drift hits both. The whole-page mode is the scraper's
own fallback for engines without the filtered path. Prints a table and writes JSON.

    .venv/bin/python -m benchmarks.routing.scrape_cost --rounds 200
    .venv/bin/python -m benchmarks.routing.scrape_cost --url http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

from benchmarks.routing import launch
from gateway.endpoints import EndpointRegistry
from gateway.metrics import GatewayMetrics
from gateway.scraper import SERIES_FILTER, MetricsScraper
from gateway.settings import ProxySettings, RoutingSettings
from gateway.upstream import Upstream

MODES = ("filtered", "whole")


async def _warm(client: httpx.AsyncClient, url: str) -> None:
    model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
    for n in (1, 2):
        body = {"model": model, "prompt": "warm up " * 50, "max_tokens": 4, "n": n}
        (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()


async def _measure(urls: list[str], rounds: int, blocks: int) -> dict[str, dict[str, float]]:
    registry = EndpointRegistry()
    for url in urls:
        registry.add(url)
    metrics = GatewayMetrics.create(registry)
    cpu = dict.fromkeys(MODES, 0.0)
    done = dict.fromkeys(MODES, 0)
    failed = dict.fromkeys(MODES, 0)
    limits = httpx.Limits(max_connections=2 * len(urls), max_keepalive_connections=2 * len(urls))
    control = Upstream.for_control(ProxySettings())
    async with httpx.AsyncClient(timeout=5.0, limits=limits) as client:
        for url in urls:  # observations in every histogram: a page as under load
            await _warm(client, url)
        filtered_page = await client.get(f"{urls[0]}/metrics/", params=SERIES_FILTER)
        whole_page = await client.get(f"{urls[0]}/metrics")
        sizes = {"filtered": len(filtered_page.content), "whole": len(whole_page.content)}
        for block in range(2 * blocks):
            mode = MODES[block % 2]
            scraper = MetricsScraper(
                client=control,
                endpoints=registry,
                settings=RoutingSettings(),
                metrics=metrics,
                filtered=mode == "filtered",  # whole: as for an engine without /metrics/
            )
            await scraper.scrape_once()  # warm the connections outside the measurement
            started = time.process_time()
            for _ in range(rounds // blocks):
                updated = await scraper.scrape_once()
                done[mode] += updated
                failed[mode] += len(urls) - updated
            cpu[mode] += time.process_time() - started
    await control.aclose()
    return {
        m: {
            "scrapes": done[m],
            "failed": failed[m],
            "cpu_ms_per_scrape": cpu[m] / max(1, done[m]) * 1e3,
            "page_bytes": sizes[m],
        }
        for m in MODES
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.routing.scrape_cost", description=__doc__
    )
    p.add_argument("--url", action="append", default=[], help="engine base URL (repeatable)")
    p.add_argument("--engines", type=int, default=4, help="enginesim engines when no --url")
    p.add_argument("--rounds", type=int, default=200, help="scrape rounds per mode")
    p.add_argument("--blocks", type=int, default=4, help="alternating blocks per mode")
    p.add_argument("--out", type=Path, default=Path("results/scrape-cost.json"))
    args = p.parse_args(argv)
    cluster = None
    urls = [u.rstrip("/") for u in args.url]
    try:
        if not urls:
            cluster = launch.start_enginesim(
                engines=args.engines, profile="llama3-8b-a100", speed=1.0, model="llama3-8b",
                log_dir=Path(tempfile.mkdtemp(prefix="scrape-cost-")),
            )  # fmt: skip
            urls = list(cluster.urls)
        rows = anyio.run(_measure, urls, max(args.blocks, args.rounds), args.blocks)
    finally:
        if cluster is not None:
            cluster.proc.stop()
    print(f"{'mode':<10}{'scrapes':>9}{'failed':>8}{'page bytes':>12}{'cpu ms/scrape':>15}")
    for mode, row in rows.items():
        print(f"{mode:<10}{row['scrapes']:>9}{row['failed']:>8}{row['page_bytes']:>12}"
              f"{row['cpu_ms_per_scrape']:>15.3f}")  # fmt: skip
    ratio = rows["filtered"]["cpu_ms_per_scrape"] / max(1e-9, rows["whole"]["cpu_ms_per_scrape"])
    print(f"filtered / whole CPU per scrape: {ratio:.2f}x ({len(urls)} engines)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"urls": urls, "rows": rows, "ratio": ratio}, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["failed"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
