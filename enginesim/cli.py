"""Command-line entry points of the simulator: ``switchyard sim`` (via :func:`run_sim`) and
``python -m enginesim`` (via :func:`main`). Both run :func:`enginesim.cluster.serve_cluster`
until Ctrl-C or SIGTERM, then shut the engines down cleanly and return.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import anyio

from enginesim.cluster import ClusterConfig, serve_cluster
from enginesim.server.faults import Faults
from enginesim.server.kvtier import DEFAULT_TIER_TTL_S

__all__ = ["main", "run_sim"]

log = logging.getLogger("enginesim")


async def _run_until_signalled(cfg: ClusterConfig) -> None:
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("enginesim: got signal %d, shutting down", signum)
                    tg.cancel_scope.cancel()
                    return

        def ready(urls: list[str]) -> None:
            for url in urls:
                log.info("enginesim: engine ready at %s", url)

        tg.start_soon(watch_signals)
        await serve_cluster(cfg, on_ready=ready)


def run_cluster(cfg: ClusterConfig) -> int:
    """Blocking: serve until Ctrl-C/SIGTERM; 0 on a clean stop, 1 if the engines failed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        anyio.run(partial(_run_until_signalled, cfg), backend="asyncio")
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    except (OSError, RuntimeError, ValueError, ExceptionGroup) as exc:
        log.error("enginesim failed: %s", "; ".join(_messages(exc)))
        return 1
    return 0


def _messages(exc: BaseException) -> list[str]:
    if isinstance(exc, BaseExceptionGroup):
        return [m for sub in exc.exceptions for m in _messages(sub)]
    return [f"{type(exc).__name__}: {exc}"]


def run_sim(cfg: ClusterConfig) -> None:
    """What ``switchyard sim`` calls (exits with status 1 if the engines failed)."""
    code = run_cluster(cfg)
    if code:
        sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m enginesim", description=__doc__)
    p.add_argument("--engines", type=int, default=1, help="engines in this process")
    p.add_argument("--base-port", type=int, default=8100, help="engine i on base_port+i (0: free)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--profile", default="cpu-smollm2", help="profile name or JSON file")
    p.add_argument("--model", default=None, help="served model name (default: profile's)")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer.json or a model directory holding one (default: hash tokenizer)",
    )
    p.add_argument("--kv-events", action="store_true", help="publish KV events over ZMQ")
    p.add_argument("--kv-events-base-port", type=int, default=5557)
    p.add_argument(
        "--kv-tier",
        default=None,
        metavar="URL",
        help="shared KV tier: redis://host:port/db of the block index (docs/kvtier.md)",
    )
    p.add_argument("--kv-tier-ttl-s", type=float, default=DEFAULT_TIER_TTL_S)
    p.add_argument(
        "--kv-tier-async",
        action="store_true",
        help="tier loads run beside the batch (the request waits) instead of inside its step",
    )
    cold = p.add_mutually_exclusive_group()
    cold.add_argument("--cold-start-s", type=float, default=0.0, help="simulated cold start")
    cold.add_argument("--profile-cold-start", action="store_true", help="use the profile's")
    p.add_argument("--fault-error-rate", type=float, default=0.0, help="fraction 0..1")
    p.add_argument("--fault-error-status", default="500", help="comma-separated statuses")
    p.add_argument("--fault-hang", action="store_true", help="requests never answer")
    p.add_argument("--fault-slowdown", type=float, default=1.0, help="step-time factor >= 1")
    p.add_argument("--fault-crash-after-tokens", type=int, default=None)
    p.add_argument("--fault-refuse-connections", action="store_true")
    p.add_argument("--fault-dead", action="store_true", help="/health 503, requests 503")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def _check_tokenizer(parser: argparse.ArgumentParser, path: str | None) -> None:
    """A --tokenizer that names nothing is a usage error (exit 2), never a silent fallback."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not (p.is_file() or (p / "tokenizer.json").is_file()):
        parser.error(f"--tokenizer {path}: no tokenizer.json there (a file or a model directory)")


def config_from_args(argv: Sequence[str] | None = None) -> ClusterConfig:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_tokenizer(parser, args.tokenizer)
    faults = Faults(
        error_rate=args.fault_error_rate,
        error_status=tuple(int(s) for s in args.fault_error_status.split(",") if s.strip()),
        hang=args.fault_hang,
        slowdown=max(1.0, args.fault_slowdown),
        crash_mid_stream_after_tokens=args.fault_crash_after_tokens,
        refuse_connections=args.fault_refuse_connections,
        dead=args.fault_dead,
    )
    return ClusterConfig(
        engines=args.engines,
        base_port=args.base_port,
        host=args.host,
        profile=args.profile,
        speed=args.speed,
        kv_events=args.kv_events,
        kv_events_base_port=args.kv_events_base_port,
        model=args.model,
        seed=args.seed,
        cold_start_s=None if args.profile_cold_start else args.cold_start_s,
        faults=faults,
        tokenizer=args.tokenizer,
        log_level=args.log_level,
        kv_tier=args.kv_tier,
        kv_tier_ttl_s=args.kv_tier_ttl_s,
        kv_tier_async=args.kv_tier_async,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cluster(config_from_args(argv))


if __name__ == "__main__":
    sys.exit(main())
