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
    broker: str | None = typer.Option(None, help="mqtt://host:port (3.1.1) or mqtt5://host:port; default: the enrolled identity's, else mqtt://127.0.0.1:1883."),
    broker_username: str | None = typer.Option(None, "--broker-username", help="This device's broker user name (from enrolment)."),
    broker_password: str | None = typer.Option(None, "--broker-password", envvar="SLMOPS_AGENT_BROKER_PASSWORD", help="This device's broker password; prefer the environment variable, which other users cannot read in the process list."),
    broker_ca: Path | None = typer.Option(None, "--broker-ca", help="PEM CA file the broker's TLS certificate must chain to (default: the system store)."),
    broker_cert: Path | None = typer.Option(None, "--broker-cert", help="PEM client certificate for a broker that asks for one (mutual TLS)."),
    broker_key: Path | None = typer.Option(None, "--broker-key", help="PEM private key of --broker-cert (unless it is in the same file)."),
    fleet_ca: Path | None = typer.Option(None, "--fleet-ca", envvar="SLMOPS_AGENT_FLEET_CA_FILE", help="PEM CA the fleet's HTTPS certificate must chain to, for bundle and root downloads (default: the system store)."),
    fleet_cert: Path | None = typer.Option(None, "--fleet-cert", envvar="SLMOPS_AGENT_FLEET_CERT_FILE", help="PEM client certificate for a fleet that asks for one (mutual TLS)."),
    fleet_key: Path | None = typer.Option(None, "--fleet-key", envvar="SLMOPS_AGENT_FLEET_KEY_FILE", help="PEM private key of --fleet-cert (unless it is in the same file)."),
    trust_root: Path | None = typer.Option(None, "--trust-root", help="The fleet's root.json (from 'slmops keys init'): the keys bundles and commands must be signed by. Required on the first start."),
    bundle_origin: list[str] = typer.Option([], "--bundle-origin", help="The fleet's public URL (http(s)://host:port); bundles are downloaded only from there. Default: the enrolled identity's fleet URL; repeat for several."),
    api_host: str = typer.Option("127.0.0.1", help="Local API address; keep it on loopback so prompts stay on the device."),
    api_port: int = typer.Option(8800, help="Local API port (0: any free port)."),
    telemetry_interval: float = typer.Option(30.0, help="Seconds between telemetry samples."),
    reconnect_max: float = typer.Option(10.0, help="Longest wait in seconds between two tries to reach the broker."),
    api_key: str | None = typer.Option(None, envvar="SLMOPS_AGENT_API_KEY", help="Bearer key the local API asks for (needed to listen beyond loopback)."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="Extra Host header value the API accepts (DNS-rebinding guard); repeat."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Browser origin allowed to call the API (CORS is off without one); repeat."),
    queue_size: int = typer.Option(16, help="Requests that may wait for the model; one more gets 429."),
    workers: int = typer.Option(1, help="Generation workers sharing the model."),
    threads: int = typer.Option(0, help="onnxruntime threads per generation (0: one per core)."),
    spin: bool = typer.Option(False, "--spin/--no-spin", help="Let onnxruntime threads spin between ops (faster on idle cores, burns CPU)."),
    request_timeout: float = typer.Option(300.0, help="Seconds a request may queue and generate before it ends."),
    max_tokens: int = typer.Option(512, "--default-max-tokens", help="Answer budget in tokens when a request names none (capped by the context)."),
    max_body: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted; larger gets 413."),
    download_deadline: float = typer.Option(1800.0, help="Seconds a whole bundle download may take, retries included."),
    download_min_rate: int = typer.Option(1024, help="Bytes/s a download must average over --download-rate-window (0: no minimum)."),
    download_rate_window: float = typer.Option(30.0, help="Seconds over which the download rate is averaged."),
    check_hashes: bool = typer.Option(False, "--check-hashes/--no-check-hashes", help="sha256 the active model's files at start and before answering \"already active\" (sizes are always checked)."),
    fleet_token: str | None = typer.Option(None, envvar="SLMOPS_AGENT_FLEET_TOKEN", show_default=False, help="The fleet API token bundle downloads send; default: the enrolled identity's."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Connect to the broker, serve the active model locally, and apply deploy commands as they come."""
    import logging

    from protocol.errors import SlmopsError

    from protocol.topics import check_device_id

    from .config import AgentConfig, Limits, Serving
    from .enrol import resolve
    from .service import Agent

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        creds = resolve(data_dir, check_device_id(device_id), fleet_token=fleet_token, broker_url=broker)
        config = AgentConfig(
            device_id=device_id,
            data_dir=data_dir,
            broker_url=creds.broker_url,
            fleet_token=creds.fleet_token,
            fleet_ca_file=fleet_ca,
            fleet_cert_file=fleet_cert,
            fleet_key_file=fleet_key,
            trust_root=trust_root,
            bundle_origins=tuple(bundle_origin) or creds.bundle_origins,
            api_host=api_host,
            api_port=api_port,
            telemetry_interval_s=telemetry_interval,
            reconnect_max_s=reconnect_max,
            broker_username=broker_username or creds.broker_username,
            broker_password=broker_password or creds.broker_password,
            broker_ca_file=broker_ca,
            broker_cert_file=broker_cert,
            broker_key_file=broker_key,
            limits=Limits(
                download_deadline_s=download_deadline,
                download_min_rate_bps=download_min_rate,
                download_rate_window_s=download_rate_window,
                check_hashes=check_hashes,
            ),
            serving=Serving(
                queue_size=queue_size,
                workers=workers,
                intra_op_threads=threads,
                spinning=spin,
                request_timeout_s=request_timeout,
                default_max_tokens=max_tokens,
                max_body_bytes=max_body,
                api_key=api_key or None,
                allowed_hosts=tuple(allowed_host),
                cors_origins=tuple(cors_origin),
            ),
        )
        Agent(config).run_forever()
    except SlmopsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


@app.command()
def enrol(
    fleet: str = typer.Option(..., "--fleet", help="The fleet's base URL, e.g. https://fleet.example:8700."),
    token: str = typer.Option(..., "--token", envvar="SLMOPS_AGENT_ENROL_TOKEN", show_default=False, help="One-time enrolment token from 'slmops fleet enrol-token create'."),
    device_id: str = typer.Option(..., "--device-id", help="This device's id."),
    data_dir: Path = typer.Option(Path("./agent-data"), help="The agent's data folder; the identity goes to state/identity.json."),
    force: bool = typer.Option(False, "--force", help="Replace an identity this device already has."),
    fleet_ca: Path | None = typer.Option(None, "--fleet-ca", envvar="SLMOPS_AGENT_FLEET_CA_FILE", help="PEM CA the fleet's HTTPS certificate must chain to (default: the system store); give it to 'agent run' too."),
    fleet_cert: Path | None = typer.Option(None, "--fleet-cert", envvar="SLMOPS_AGENT_FLEET_CERT_FILE", help="PEM client certificate for a mutual-TLS fleet."),
    fleet_key: Path | None = typer.Option(None, "--fleet-key", envvar="SLMOPS_AGENT_FLEET_KEY_FILE", help="PEM private key of --fleet-cert."),
) -> None:
    """Enrol this device: trade a one-time token for its own broker credentials and fleet API token."""
    from protocol.errors import ConfigError, SlmopsError

    from .config import fleet_tls
    from .enrol import enrol as do_enrol
    from .enrol import identity_path, save_identity

    try:
        if identity_path(data_dir).exists() and not force:
            raise ConfigError(f"{identity_path(data_dir)} exists: this device is enrolled; pass --force to enrol again")
        identity = do_enrol(fleet, token, device_id, verify=fleet_tls(fleet_ca, fleet_cert, fleet_key))
        path = save_identity(data_dir, identity)
    except SlmopsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"enrolled {identity.device_id}: credentials in {path} (mode 0600); broker {identity.broker_url}")
