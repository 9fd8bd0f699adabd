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


@app.command("kube-sim")
def kube_sim(
    port: int = typer.Option(..., help="port on 127.0.0.1 (0: a free port, printed)"),
    kubeconfig: str = typer.Option(..., help="write a kubeconfig for the emulator here"),
    speed: float = typer.Option(1.0, help="simulated seconds per wall second"),
    seed: int = typer.Option(0, help="seed of pod names and fault randomness"),
    drain_s: float = typer.Option(30.0, help="default simulated drain limit of deleted pods"),
    history: int = typer.Option(2000, min=1, help="watch events kept (older rv: 410 Gone)"),
    log_level: str = typer.Option("warning", help="log level (stderr)"),
) -> None:
    """An emulated Kubernetes API (tests, benchmarks) whose pods run simulated engines."""
    from enginesim.kube.server import KubeSimConfig, run_kube_sim

    if speed <= 0:
        raise typer.BadParameter("speed must be > 0")
    cfg = KubeSimConfig(port=port, kubeconfig=Path(kubeconfig), speed=speed, seed=seed,
                        drain_s=drain_s, history=history, log_level=log_level)  # fmt: skip
    raise typer.Exit(run_kube_sim(cfg))


@app.command()
def autoscaler(
    config: str = typer.Option(..., "--config", "-c", help="switchyard.yaml (autoscaling:)"),
    metrics_port: int = typer.Option(9091, help="port of its own /metrics (0: a free port)"),
    metrics_host: str = typer.Option("127.0.0.1", help="address of its own /metrics"),
) -> None:
    """The autoscaler on its own, leader-elected: scrapes the target's pods, patches its scale."""
    from gateway.autoscaling import run_standalone
    from gateway.logs import configure_logging

    settings = _load(Path(config))
    section = settings.autoscaling
    problem = section.standalone_problem()
    if problem:
        typer.echo(f"switchyard: invalid configuration: {problem}", err=True)
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_format)

    def started(port: int) -> None:
        typer.echo(
            f"switchyard autoscaler for {section.target.target()} (policy {section.policy}), "
            f"metrics on http://{metrics_host}:{port}/metrics"
        )

    run = partial(run_standalone, section, host=metrics_host, port=metrics_port, on_started=started)
    _run(run)


def main() -> None:
    app()
