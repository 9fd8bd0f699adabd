"""The ``switchyard`` console script: ``up`` (quickstart), ``serve`` (real engines), ``sim``.

Settings are loaded here, once, and passed down; nothing else reads the environment.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import anyio
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Switchyard LLM gateway")


def _run(func: Any, *, uvloop: bool = False) -> None:
    """Run an async entry point; a startup failure becomes one clear line and exit code 1."""
    try:
        anyio.run(func, backend="asyncio", backend_options={"use_uvloop": uvloop})
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError, ExceptionGroup) as exc:
        for err in _leaves(exc):
            typer.echo(f"switchyard: {err}", err=True)
        raise typer.Exit(1) from exc


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _load(config: Path | None, **server: Any) -> Any:
    from gateway.settings import Settings

    overrides = {k: v for k, v in server.items() if v is not None}
    try:
        return Settings.load(config, **({"server": overrides} if overrides else {}))
    except (OSError, ValueError) as exc:
        typer.echo(f"switchyard: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def up(
    port: int = typer.Option(8000, help="gateway port on 127.0.0.1"),
    engines: int = typer.Option(4, min=1, max=64, help="number of simulated engines"),
    profile: str = typer.Option("cpu-smollm2", help="enginesim timing profile"),
    speed: float = typer.Option(1.0, help="simulated seconds per wall second"),
    engine_base_port: int = typer.Option(0, help="first engine port (0: free ports)"),
    model: str | None = typer.Option(None, help="served model name (default: profile's)"),
    config: str | None = typer.Option(None, help="optional switchyard.yaml for gateway settings"),
    redis: bool = typer.Option(False, help="also start a private redis-server: shared state"),
) -> None:
    """Quickstart: the gateway on 127.0.0.1 with simulated engines, nothing else needed."""
    from gateway.logs import configure_logging
    from gateway.quickstart import run_up

    settings = _load(Path(config) if config else None, host="127.0.0.1", port=port)
    configure_logging(settings.log_level, settings.log_format)
    run = partial(
        run_up,
        settings,
        engines=engines,
        profile=profile,
        speed=speed,
        engine_base_port=engine_base_port,
        model=model,
        redis=redis,
    )
    _run(run, uvloop=settings.server.uvloop)


@app.command()
def serve(
    config: str = typer.Option(..., "--config", "-c", help="switchyard.yaml"),
    host: str | None = typer.Option(None, help="override server.host"),
    port: int | None = typer.Option(None, help="override server.port"),
    workers: int | None = typer.Option(
        None, min=1, max=64, help="gateway processes sharing the port (server.workers, default 1)"
    ),
) -> None:
    """The gateway in front of the real engines listed in the config file."""
    from gateway.logs import configure_logging
    from gateway.runner import build_gateway, serve_gateway

    path = Path(config)
    settings = _load(path, host=host, port=port, workers=workers)
    configure_logging(settings.log_level, settings.log_format)

    def announce(bound: int) -> None:
        many = settings.server.workers
        typer.echo(
            f"Switchyard gateway on http://{settings.server.host}:{bound} "
            f"with {len(settings.engines)} engine(s) from {config}"
            + (f", {many} workers" if many > 1 else "")
        )

    if settings.server.workers > 1:
        from gateway.workers import serve_workers

        try:
            code = serve_workers(
                settings, config_path=path, workers=settings.server.workers, on_bound=announce
            )
        except OSError as exc:
            typer.echo(f"switchyard: {exc}", err=True)
            raise typer.Exit(1) from exc
        raise typer.Exit(code)

    gateway = build_gateway(settings, config_path=path)

    async def started(bound: int) -> None:
        announce(bound)

    _run(partial(serve_gateway, gateway, on_started=started), uvloop=settings.server.uvloop)


@app.command()
def sim(
    engines: int = typer.Option(1, help="number of simulated engines in this process"),
    base_port: int = typer.Option(8100, help="first port; engine i listens on base_port + i"),
    profile: str = typer.Option("cpu-smollm2", help="timing profile name or JSON file"),
    speed: float = typer.Option(1.0, help="simulated seconds per wall second"),
    kv_events: bool = typer.Option(False, help="publish vLLM KV events over ZMQ"),
    model: str | None = typer.Option(None, help="served model name (default: profile's)"),
    host: str = typer.Option("127.0.0.1"),
) -> None:
    """Run N vLLM-compatible simulated engines in one process."""
    from enginesim.cli import run_sim
    from enginesim.cluster import ClusterConfig

    run_sim(
        ClusterConfig(
            engines=engines,
            base_port=base_port,
            host=host,
            profile=profile,
            speed=speed,
            kv_events=kv_events,
            model=model,
        )
    )


def main() -> None:
    app()
