"""The ``switchyard`` console script: ``up`` (quickstart), ``serve`` (real engines), ``sim``."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Switchyard LLM gateway")


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

    run_sim(
        engines=engines,
        base_port=base_port,
        profile=profile,
        speed=speed,
        kv_events=kv_events,
        model=model,
        host=host,
    )


def main() -> None:
    app()
