"""The fleet's command line: three Typer apps that `slmops` mounts.

    app          serve | devices | deploy | upload     run a fleet, or drive a running one over HTTP (--url)
    bundle_app   build | sign | verify | inspect       bundle files on this machine
    keys_app     generate                              Ed25519 signing keys

Heavy modules (sqlalchemy, fastapi, uvicorn, amqtt, httpx) are imported inside the commands that need them, so
`import fleet.cli` stays light. Any slmops error ends the command with a red one-line reason and exit code 2.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import ConfigError, SlmopsError, TransportError

if TYPE_CHECKING:
    from protocol.manifest import Manifest
    from protocol.trust import PrivateKey

app = typer.Typer(help="Run the fleet server, or drive a running one.", no_args_is_help=True)
bundle_app = typer.Typer(help="Build, sign, verify and inspect bundle files.", no_args_is_help=True)
keys_app = typer.Typer(help="Ed25519 keys that sign bundles.", no_args_is_help=True)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
DEFAULT_URL = os.environ.get("SLMOPS_FLEET_URL", "http://127.0.0.1:8700")
UPLOAD_CHUNK = 1 << 20  # bytes per read while streaming an upload
HTTP_TIMEOUT_S = 60.0  # seconds per request to a running fleet (uploads stream, so this is per read/write)

UrlOpt = Annotated[str, typer.Option("--url", help="base URL of a running fleet (env SLMOPS_FLEET_URL)")]


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except SlmopsError as exc:
        err.print(f"[red]error ({exc.code}):[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc


# ---- serve and drive a fleet ----------------------------------------------------------------------------------


@app.command()
def serve(
    data_dir: Annotated[Optional[Path], typer.Option(help="where bundles and the SQLite file live")] = None,
    host: Annotated[Optional[str], typer.Option(help="HTTP listen address")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port")] = None,
    public_url: Annotated[Optional[str], typer.Option(help="base URL devices download from")] = None,
    database_url: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL (default: SQLite in data dir)")] = None,
    broker_url: Annotated[Optional[str], typer.Option(help="mqtt://host:port or mqtt5://...; default: embedded")] = None,
    broker_port: Annotated[Optional[int], typer.Option(help="port of the embedded MQTT broker")] = None,
    reconnect_max: Annotated[Optional[float], typer.Option(help="longest wait in seconds between tries to reach the broker")] = None,
    broker_username: Annotated[Optional[str], typer.Option(help="the fleet's broker user name (default: fleet)")] = None,
    broker_password: Annotated[Optional[str], typer.Option(help="the fleet's broker password; prefer env SLMOPS_FLEET_BROKER_PASSWORD (default with the embedded broker: random per run)")] = None,
    broker_ca: Annotated[Optional[Path], typer.Option(help="PEM CA the broker's TLS certificate must chain to (mqtts://; default: system store)")] = None,
    broker_cert: Annotated[Optional[Path], typer.Option(help="PEM client certificate for a broker that asks for one")] = None,
    broker_key: Annotated[Optional[Path], typer.Option(help="PEM private key of --broker-cert")] = None,
    broker_admin_username: Annotated[Optional[str], typer.Option(help="mosquitto dynamic-security admin that enrols and revokes devices (password: env SLMOPS_FLEET_BROKER_ADMIN_PASSWORD)")] = None,
    trusted_key: Annotated[Optional[list[Path]], typer.Option(help=".pub file uploads must be signed by")] = None,
) -> None:
    """Run the fleet: HTTP API, MQTT messaging and (unless --broker-url) an embedded broker. Ctrl-C stops it."""
    import logging

    with _errors():
        import uvicorn
        from pydantic import ValidationError

        from .api.app import create_app
        from .settings import Settings

        overrides: dict[str, Any] = {
            "data_dir": data_dir,
            "host": host,
            "port": port,
            "public_url": public_url,
            "database_url": database_url,
            "broker_url": broker_url,
            "embedded_broker_port": broker_port,
            "reconnect_max_s": reconnect_max,
            "broker_username": broker_username,
            "broker_password": broker_password,
            "broker_ca_file": broker_ca,
            "broker_cert_file": broker_cert,
            "broker_key_file": broker_key,
            "broker_admin_username": broker_admin_username,
            "trusted_keys": trusted_key or None,
        }
        try:
            settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(f"bad fleet setting: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from exc
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        kind = "external" if settings.broker_url else "embedded"
        out.print(f"fleet listening on http://{settings.host}:{settings.port} (devices download from {settings.public_url})")
        out.print(f"MQTT broker ({kind}): {settings.effective_broker_url}")
        out.print(f"data: {settings.data_dir.resolve()}  database: {settings.database_url}")
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


@app.command()
def devices(url: UrlOpt = DEFAULT_URL, group: Annotated[Optional[str], typer.Option(help="only this group")] = None) -> None:
    """List the devices a running fleet knows."""
    with _errors():
        rows = _http("GET", url, "/api/v1/devices", params={"group": group} if group else None)
        table = Table("device", "online", "active", "groups", "last seen", "agent")
        for d in rows:
            active = f"{d['active']['name']} v{d['active']['version']}" if d["active"] else "-"
            online = "[green]yes[/green]" if d["online"] else "[red]no[/red]"
            table.add_row(d["id"], online, active, ", ".join(d["groups"]), d["last_seen"] or "-", d["agent_version"] or "-")
        out.print(table)


@app.command()
def deploy(
    bundle: Annotated[str, typer.Option(help="bundle name")],
    version: Annotated[int, typer.Option(help="bundle version")],
    group: Annotated[Optional[str], typer.Option(help="every device of this group")] = None,
    device: Annotated[Optional[str], typer.Option(help="this one device")] = None,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Deploy a stored bundle to a device or a group."""
    with _errors():
        if (group is None) == (device is None):
            raise ConfigError("give exactly one of --group and --device")
        body = {"bundle": bundle, "version": version, "group": group, "device_id": device}
        dep = _http("POST", url, "/api/v1/deployments", json={k: v for k, v in body.items() if v is not None})
        out.print(f"deployment [bold]{dep['id']}[/bold]: {bundle} v{version} -> {len(dep['targets'])} device(s)")
        for t in dep["targets"]:
            out.print(f"  {t['device_id']}: {t['state']}")


@app.command()
def upload(path: Annotated[Path, typer.Argument(help="bundle file")], url: UrlOpt = DEFAULT_URL) -> None:
    """Upload a bundle file to a running fleet, which verifies it before storing it."""
    with _errors():
        if not path.is_file():
            raise ConfigError(f"{path} is not a file")
        headers = {"content-type": "application/octet-stream", "content-length": str(path.stat().st_size)}
        b = _http("POST", url, "/api/v1/bundles", content=_chunks(path), headers=headers)
        out.print(f"stored {b['name']} v{b['version']}: {b['size']} bytes, sha256 {b['sha256']}")
        if b.get("warning"):
            out.print(f"[yellow]warning:[/yellow] {b['warning']}")


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            yield chunk


def _http(method: str, base: str, path: str, **kwargs: Any) -> Any:
    import httpx

    from .errors import FleetError

    try:
        r = httpx.request(method, base.rstrip("/") + path, timeout=HTTP_TIMEOUT_S, **kwargs)
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot reach the fleet at {base}: {exc}. Is 'slmops fleet serve' running there?") from exc
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise FleetError(f"fleet answered {r.status_code}: {detail}")
    return r.json()


# ---- bundles --------------------------------------------------------------------------------------------------


@bundle_app.command()
def build(
    model: Annotated[Path, typer.Option(help="exported onnxruntime-genai folder (with eval.json)")],
    name: Annotated[str, typer.Option(help="bundle name")],
    version: Annotated[int, typer.Option(help="integer version; only grows")],
    out_file: Annotated[Path, typer.Option("--out", help="bundle file to write")],
    key: Annotated[Optional[list[Path]], typer.Option(help="private key to sign with; none: unsigned")] = None,
    base_model: Annotated[str, typer.Option(help="what the model was made from")] = "",
    precision: Annotated[str, typer.Option(help="int4 | int8 | fp16 | fp32")] = "int4",
    expires_days: Annotated[Optional[int], typer.Option(help="signature validity in days")] = None,
    description: Annotated[str, typer.Option(help="free text")] = "",
) -> None:
    """Pack a model folder into a bundle, signed with each --key."""
    with _errors():
        from .bundles import build_bundle

        now = datetime.now(timezone.utc)
        manifest = build_bundle(
            model,
            out_file,
            name=name,
            version=version,
            signers=[_private_key(k) for k in key or []],
            now=now,
            base_model=base_model,
            precision=precision,
            expires=now + timedelta(days=expires_days) if expires_days else None,
            description=description,
        )
        _summary(manifest)
        state = f"signed by {len(key)} key(s)" if key else "[yellow]unsigned[/yellow]: run 'slmops bundle sign'"
        out.print(f"wrote {out_file} ({out_file.stat().st_size} bytes), {state}")


@bundle_app.command()
def sign(
    file: Annotated[Path, typer.Argument(help="bundle file, rewritten in place")],
    key: Annotated[list[Path], typer.Option(help="private key to add a signature with")],
) -> None:
    """Add signatures to a bundle (checking every file's hash on the way)."""
    with _errors():
        from .bundles import sign_bundle

        manifest = sign_bundle(file, [_private_key(k) for k in key])
        out.print(f"signed {manifest.name} v{manifest.version} with {len(key)} key(s)")


@bundle_app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="bundle file")],
    trusted_key: Annotated[list[Path], typer.Option(help="public key (.pub) to trust; repeat for several")],
    threshold: Annotated[int, typer.Option(help="distinct trusted signatures needed")] = 1,
) -> None:
    """Check signatures, expiry and every file's hash; print the manifest and OK, or the reason and exit 2."""
    with _errors():
        from protocol.trust import Keyring, PublicKey

        from .bundles import verify_bundle

        keys = tuple(PublicKey.from_pem(_read(p)) for p in trusted_key)
        manifest = verify_bundle(file, Keyring(keys=keys, threshold=threshold), now=datetime.now(timezone.utc))
        _summary(manifest)
        out.print("[green]OK[/green]")


@bundle_app.command()
def inspect(file: Annotated[Path, typer.Argument(help="bundle file")]) -> None:
    """Show a bundle's manifest and signers without checking them."""
    with _errors():
        from protocol.trust import read_unverified

        from .bundles import read_bundle_envelope, signer_keyids

        envelope = read_bundle_envelope(file)
        manifest = read_unverified(envelope)
        _summary(manifest)
        table = Table("file", "bytes", "sha256")
        for f in manifest.files:
            table.add_row(f.path, str(f.size), f.sha256[:16] + "...")
        out.print(table)
        ids = signer_keyids(envelope)
        out.print(f"signatures (not checked): {', '.join(i[:16] for i in ids) or 'none'}")


def _summary(m: Manifest) -> None:
    metrics = ", ".join(f"{k}={v:g}" for k, v in sorted(m.eval.metrics.items())) or "none"
    out.print(f"[bold]{m.name} v{m.version}[/bold]  {m.target.runtime} {m.target.precision}  base: {m.base_model or '-'}")
    out.print(f"  {len(m.files)} file(s), {m.total_size} bytes; created {m.created.isoformat()}; expires {m.expires or 'never'}")
    out.print(f"  eval ({m.eval.dataset or '-'}): {metrics}; {len(m.health.prompts)} smoke prompt(s)")


def _private_key(path: Path) -> PrivateKey:
    from protocol.trust import PrivateKey

    return PrivateKey.from_pem(_read(path))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


# ---- keys -----------------------------------------------------------------------------------------------------


@keys_app.callback()
def _keys() -> None:
    """Ed25519 keys that sign bundles."""  # a callback keeps `generate` a named sub-command


@keys_app.command()
def generate(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for NAME.key and NAME.pub")],
    name: Annotated[str, typer.Option(help="file name stem")],
) -> None:
    """Write a new Ed25519 key pair: NAME.key (PKCS8 PEM, mode 0600) and NAME.pub (PEM). Never overwrites."""
    with _errors():
        from protocol.trust import generate_keypair

        key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
        existing = [str(p) for p in (key_path, pub_path) if p.exists()]
        if existing:
            raise ConfigError(f"{', '.join(existing)} already exist(s); choose another --name or --out")
        out_dir.mkdir(parents=True, exist_ok=True)
        key = generate_keypair()
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_pem())
        pub_path.write_bytes(key.public.to_pem())
        out.print(f"wrote {key_path} (keep it secret) and {pub_path}; key id {key.keyid}")
