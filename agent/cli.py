"""`slmops agent ...`: run the on-device agent."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Run the on-device agent: updates over MQTT, local OpenAI-compatible inference.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Run the on-device agent: updates over MQTT, local OpenAI-compatible inference."""


@app.command()
def run(
    device_id: str = typer.Option(..., "--device-id", help="This device's id (letters, digits, '.', '_', '-')."),
    data_dir: Path = typer.Option(Path("./agent-data"), help="Where models, staging and state live."),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", help="mqtt://host:port (3.1.1) or mqtt5://host:port."),
    trusted_key: list[Path] = typer.Option(..., "--trusted-key", help="Public key (.pub) whose signature bundles need; repeat for several."),
    threshold: int = typer.Option(1, help="How many distinct trusted keys must sign a bundle."),
    api_host: str = typer.Option("127.0.0.1", help="Local API address; keep it on loopback so prompts stay on the device."),
    api_port: int = typer.Option(8800, help="Local API port (0: any free port)."),
    telemetry_interval: float = typer.Option(30.0, help="Seconds between telemetry samples."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Connect to the broker, serve the active model locally, and apply deploy commands as they come."""
    import logging

    from protocol.errors import SlmopsError

    from .config import AgentConfig
    from .service import Agent

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = AgentConfig(
            device_id=device_id,
            data_dir=data_dir,
            broker_url=broker,
            trusted_keys=tuple(trusted_key),
            threshold=threshold,
            api_host=api_host,
            api_port=api_port,
            telemetry_interval_s=telemetry_interval,
        )
        Agent(config).run_forever()
    except SlmopsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
