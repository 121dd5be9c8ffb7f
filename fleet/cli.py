"""The fleet's command line: two Typer apps that `slmops` mounts (keys live in fleet/keys_cli.py).

    app          serve | devices | deploy | upload     run a fleet, or drive a running one over HTTP (--url, --token;
                                                       --ca, --cert, --key for an https or mutual-TLS fleet)
                 rollout ... | groups | tag            staged rollouts, groups and tags (fleet/rollout_cli.py)
                 revoke | reinstate | audit            devices' identities and the audit log (admin token)
                 token create|list|revoke              API tokens (admin token)
                 enrol-token create|list               one-time enrolment tokens for devices (admin token)
                 db upgrade|current|history|revision   the database's schema (fleet/db_cli.py; no running fleet)
    bundle_app   build | sign | verify | inspect       bundle files on this machine

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

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
DEFAULT_URL = os.environ.get("SLMOPS_FLEET_URL", "http://127.0.0.1:8700")
UPLOAD_CHUNK = 1 << 20  # bytes per read while streaming an upload
HTTP_TIMEOUT_S = 60.0  # seconds per request to a running fleet (uploads stream, so this is per read/write)

UrlOpt = Annotated[str, typer.Option("--url", help="base URL of a running fleet (env SLMOPS_FLEET_URL)")]
TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", envvar="SLMOPS_FLEET_TOKEN", show_default=False, help="API token for the fleet (env SLMOPS_FLEET_TOKEN)"),
]
CaOpt = Annotated[
    Optional[Path],
    typer.Option("--ca", envvar="SLMOPS_FLEET_CA_FILE", show_default=False,
                 help="PEM CA the fleet's HTTPS certificate must chain to (env SLMOPS_FLEET_CA_FILE; default: system store)"),
]
CertOpt = Annotated[
    Optional[Path],
    typer.Option("--cert", envvar="SLMOPS_FLEET_CERT_FILE", show_default=False,
                 help="PEM client certificate for a mutual-TLS fleet (env SLMOPS_FLEET_CERT_FILE)"),
]
KeyOpt = Annotated[
    Optional[Path],
    typer.Option("--key", envvar="SLMOPS_FLEET_KEY_FILE", show_default=False,
                 help="PEM private key of --cert, unless it is in the same file (env SLMOPS_FLEET_KEY_FILE)"),
]
token_app = typer.Typer(help="API tokens of a running fleet (needs an admin token).", no_args_is_help=True)
enrol_token_app = typer.Typer(help="One-time enrolment tokens for devices (needs an admin token).", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(enrol_token_app, name="enrol-token")


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
    broker_ca: Annotated[Optional[Path], typer.Option(help="PEM CA the broker's TLS certificate must chain to (mqtts://; default: system store)")] = None,
    broker_cert: Annotated[Optional[Path], typer.Option(help="PEM client certificate for a broker that asks for one")] = None,
    broker_key: Annotated[Optional[Path], typer.Option(help="PEM private key of --broker-cert")] = None,
    broker_tls_cert: Annotated[Optional[Path], typer.Option(
        "--embedded-broker-tls-cert", help="PEM certificate: the embedded broker listens with TLS only (mqtts://; "
                                           "give --broker-ca, the CA that issued it, for the fleet's own client)")] = None,
    broker_tls_key: Annotated[Optional[Path], typer.Option(
        "--embedded-broker-tls-key", help="PEM private key of --embedded-broker-tls-cert")] = None,
    public_broker_url: Annotated[Optional[str], typer.Option(
        help="broker URL enrolment gives devices (default: the one the fleet uses)")] = None,
    broker_admin_username: Annotated[Optional[str], typer.Option(help="mosquitto dynamic-security admin that enrols and revokes devices (password: env SLMOPS_FLEET_BROKER_ADMIN_PASSWORD)")] = None,
    trusted_key: Annotated[Optional[list[Path]], typer.Option(help=".pub file uploads must be signed by")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM server certificate: serve HTTPS (slmops ca server)")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM private key of --tls-cert")] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(help="CA file: mutual TLS, clients must present a certificate from it")] = None,
    tls_crl: Annotated[Optional[Path], typer.Option(help="CRL of --tls-client-ca: revoked client certificates are refused")] = None,
    trust_dir: Annotated[Optional[Path], typer.Option(help="trust folder from 'slmops keys init': signs commands, "
                                                          "serves roots, its bundles role keys uploads")] = None,
) -> None:
    """Run the fleet: HTTP API, MQTT messaging and (unless --broker-url) an embedded broker. Ctrl-C stops it.

    The admin token and the fleet's broker password come from SLMOPS_FLEET_ADMIN_TOKEN and
    SLMOPS_FLEET_BROKER_PASSWORD (never flags, which other users can see); a trusted key is required."""
    import logging

    with _errors():
        import uvicorn
        from pydantic import ValidationError

        from .api.app import create_app
        from .settings import Settings
        from .tls import uvicorn_config

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
            "broker_ca_file": broker_ca,
            "broker_cert_file": broker_cert,
            "broker_key_file": broker_key,
            "broker_admin_username": broker_admin_username,
            "embedded_broker_tls_cert_file": broker_tls_cert,
            "embedded_broker_tls_key_file": broker_tls_key,
            "public_broker_url": public_broker_url,
            "trusted_keys": trusted_key or None,
            "tls_cert_file": tls_cert,
            "tls_key_file": tls_key,
            "tls_client_ca_file": tls_client_ca,
            "tls_crl_file": tls_crl,
            "trust_dir": trust_dir,
        }
        try:
            settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(f"bad fleet setting: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from exc
        config = uvicorn_config(create_app(settings), settings, log_level="info")  # checks the TLS files first
        from .broker import listener_tls

        if (broker_tls := listener_tls(settings)) is not None:
            broker_tls.check()  # and the embedded broker's, before anything listens
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        kind = "external" if settings.broker_url else "embedded"
        mtls = " with client certificates" if settings.tls_client_ca_file else ""
        out.print(f"fleet listening on {settings.scheme}://{settings.host}:{settings.port}{mtls} (devices download from {settings.public_url})")
        out.print(f"MQTT broker ({kind}): {settings.effective_broker_url}; devices are told {settings.public_broker_url}")
        out.print(f"data: {settings.data_dir.resolve()}  database: {settings.database_url}")
        if settings.tls_crl_file is not None:
            _reload_crl_on_sighup(config.tls_context, settings.tls_crl_file)
        server = uvicorn.Server(config)
        server.run()
        if not server.started:  # as uvicorn.run does: a port in use or a failed start-up is exit code 3
            raise typer.Exit(3)


def _reload_crl_on_sighup(context: Any, crl_file: Path) -> None:
    """`kill -HUP <fleet>` after publishing a new CRL: new handshakes check it; a bad file keeps the CRLs loaded."""
    import logging
    import signal

    from .tls import reload_crl

    log = logging.getLogger("fleet.tls")

    def _reload(_signum: int, _frame: object) -> None:
        try:
            reload_crl(context, crl_file)
            log.info("reloaded the CRL %s", crl_file)
        except ConfigError as exc:
            log.error("CRL not reloaded, the previous one stays in force: %s", exc)

    signal.signal(signal.SIGHUP, _reload)


@app.command()
def devices(
    url: UrlOpt = DEFAULT_URL, group: Annotated[Optional[str], typer.Option(help="only this group")] = None, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None
) -> None:
    """List the devices a running fleet knows."""
    with _errors():
        rows = _http("GET", url, "/api/v1/devices", token=token, tls=(ca, cert, key), params={"group": group} if group else None)
        table = Table("device", "online", "active", "groups", "last seen", "agent", "identity")
        for d in rows:
            active = f"{d['active']['name']} v{d['active']['version']}" if d["active"] else "-"
            online = "[green]yes[/green]" if d["online"] else "[red]no[/red]"
            identity = "[red]revoked[/red]" if d.get("revoked_at") else ("enrolled" if d.get("enrolled") else "-")
            table.add_row(
                d["id"], online, active, ", ".join(d["groups"]), d["last_seen"] or "-", d["agent_version"] or "-", identity
            )
        out.print(table)


@app.command()
def deploy(
    bundle: Annotated[str, typer.Option(help="bundle name")],
    version: Annotated[int, typer.Option(help="bundle version")],
    group: Annotated[Optional[str], typer.Option(help="every device of this group")] = None,
    device: Annotated[Optional[str], typer.Option(help="this one device")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None,
) -> None:
    """Deploy a stored bundle to a device or a group."""
    with _errors():
        if (group is None) == (device is None):
            raise ConfigError("give exactly one of --group and --device")
        body = {"bundle": bundle, "version": version, "group": group, "device_id": device}
        dep = _http("POST", url, "/api/v1/deployments", token=token, tls=(ca, cert, key), json={k: v for k, v in body.items() if v is not None})
        out.print(f"deployment [bold]{dep['id']}[/bold]: {bundle} v{version} -> {len(dep['targets'])} device(s)")
        for t in dep["targets"]:
            out.print(f"  {t['device_id']}: {t['state']}")


@app.command()
def upload(path: Annotated[Path, typer.Argument(help="bundle file")], url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """Upload a bundle file to a running fleet, which verifies it before storing it."""
    with _errors():
        if not path.is_file():
            raise ConfigError(f"{path} is not a file")
        headers = {"content-type": "application/octet-stream", "content-length": str(path.stat().st_size)}
        b = _http("POST", url, "/api/v1/bundles", token=token, tls=(ca, cert, key), content=_chunks(path), headers=headers)
        out.print(f"stored {b['name']} v{b['version']}: {b['size']} bytes, sha256 {b['sha256']}")
        if b.get("warning"):
            out.print(f"[yellow]warning:[/yellow] {b['warning']}")


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            yield chunk


@app.command()
def revoke(device: Annotated[str, typer.Argument(help="device id")], url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """Revoke a device: the broker refuses it, its API tokens stop working, it cannot enrol again."""
    with _errors():
        d = _http("POST", url, f"/api/v1/devices/{_path_part(device)}/revoke", token=token, tls=(ca, cert, key))
        out.print(f"device [bold]{escape(d['id'])}[/bold] revoked at {d['revoked_at']}")


@app.command()
def reinstate(device: Annotated[str, typer.Argument(help="device id")], url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """Lift a device's revocation; it then enrols again with a new enrolment token."""
    with _errors():
        d = _http("POST", url, f"/api/v1/devices/{_path_part(device)}/reinstate", token=token, tls=(ca, cert, key))
        out.print(f"device [bold]{escape(d['id'])}[/bold] reinstated; give it a new enrolment token")


@app.command()
def audit(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="newest rows to show")] = 50,
) -> None:
    """Show the audit log, newest first: who changed what, when."""
    with _errors():
        rows = _http("GET", url, "/api/v1/audit", token=token, tls=(ca, cert, key), params={"limit": limit})
        for r in rows:  # one line each, so the log reads (and greps) whole at any terminal width
            out.print(f"{r['at']}  {escape(r['actor'])}  {r['action']}  {escape(r['target'])}  {escape(r['detail'])}", highlight=False)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="what the token is for, e.g. ci-upload")],
    role: Annotated[str, typer.Option(help="admin | operator | viewer | device")],
    device: Annotated[Optional[str], typer.Option(help="the device, for role device")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None,
) -> None:
    """Create an API token; its secret is printed once and never again."""
    with _errors():
        body = {"name": name, "role": role, "device_id": device}
        t = _http("POST", url, "/api/v1/tokens", token=token, tls=(ca, cert, key), json={k: v for k, v in body.items() if v is not None})
        err.print(f"token {t['id']} ({escape(t['name'])}, role {t['role']}) created; it is shown only now:")
        out.print(t["token"], highlight=False)


@token_app.command("list")
def token_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """List API tokens (never their secrets)."""
    with _errors():
        table = Table("id", "name", "role", "device", "created", "by", "last used", "revoked")
        for t in _http("GET", url, "/api/v1/tokens", token=token, tls=(ca, cert, key)):
            table.add_row(
                str(t["id"]), escape(t["name"]), t["role"], t["device_id"] or "-", t["created_at"], escape(t["created_by"]),
                t["last_used_at"] or "-", t["revoked_at"] or "-",
            )  # fmt: skip
        out.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="the token's id (see 'token list')", min=1, max=(1 << 63) - 1)],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None,
) -> None:
    """Revoke an API token; it stops working at once."""
    with _errors():
        t = _http("POST", url, f"/api/v1/tokens/{token_id}/revoke", token=token, tls=(ca, cert, key))
        out.print(f"token {t['id']} ({escape(t['name'])}) revoked at {t['revoked_at']}")


@enrol_token_app.command("create")
def enrol_token_create(
    group: Annotated[Optional[list[str]], typer.Option(help="group the device joins; repeat for several")] = None,
    device: Annotated[Optional[str], typer.Option(help="only this device id may use it")] = None,
    ttl: Annotated[int, typer.Option(help="seconds until it expires", min=1, max=30 * 86400)] = 3600,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None,
) -> None:
    """Create a one-time enrolment token; give it to the device ('slmops agent enrol --token ...')."""
    with _errors():
        body: dict[str, Any] = {"groups": group or [], "ttl_s": ttl}
        if device is not None:
            body["device_id"] = device
        t = _http("POST", url, "/api/v1/enrolment-tokens", token=token, tls=(ca, cert, key), json=body)
        pinned = f" for device {escape(t['device_id'])}" if t["device_id"] else ""
        err.print(f"enrolment token {t['id']}{pinned}, groups [{', '.join(t['groups'])}], expires {t['expires_at']}; shown only now:")
        out.print(t["token"], highlight=False)


@enrol_token_app.command("list")
def enrol_token_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """List enrolment tokens (never their secrets): who made them, when they expire, which device used them."""
    with _errors():
        table = Table("id", "groups", "device", "expires", "used", "by device", "created by")
        for t in _http("GET", url, "/api/v1/enrolment-tokens", token=token, tls=(ca, cert, key)):
            table.add_row(
                str(t["id"]), ", ".join(t["groups"]), t["device_id"] or "-", t["expires_at"], t["used_at"] or "-",
                t["used_by_device"] or "-", escape(t["created_by"]),
            )  # fmt: skip
        out.print(table)


def _path_part(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _verify(base: str, ca: Path | None, cert: Path | None, key: Path | None) -> Any:
    """What httpx verifies the fleet with: True (the system store) or a context trusting `ca` and presenting `cert`."""
    if ca is None and cert is None and key is None:
        return True
    if not base.lower().startswith("https://"):
        raise ConfigError(f"--ca, --cert and --key are for an https:// fleet, but the URL is {base}: use https://")
    if key is not None and cert is None:
        raise ConfigError("--key was given without --cert: give the client certificate too")
    import ssl

    from .tls import client_context

    if ca is not None:
        return client_context(ca, cert_file=cert, key_file=key)
    ctx = ssl.create_default_context()  # the system store, and this client's certificate
    try:
        ctx.load_cert_chain(str(cert), keyfile=str(key) if key else None)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot use the client certificate {cert}: {exc.__class__.__name__}: {exc}") from exc
    return ctx


def _http(method: str, base: str, path: str, *, token: str | None = None,
          tls: tuple[Path | None, Path | None, Path | None] = (None, None, None), **kwargs: Any) -> Any:
    """One request to a running fleet; `tls` is (--ca, --cert, --key)."""
    import httpx

    from .errors import FleetError

    if token:
        kwargs["headers"] = {**(kwargs.get("headers") or {}), "Authorization": f"Bearer {token}"}
    verify = _verify(base, *tls)
    try:
        r = httpx.request(method, base.rstrip("/") + path, timeout=HTTP_TIMEOUT_S, verify=verify, **kwargs)
    except httpx.HTTPError as exc:
        hint = " Does --ca name the CA that issued the fleet's certificate?" if "CERTIFICATE" in str(exc).upper() else ""
        raise TransportError(f"cannot reach the fleet at {base}: {exc}. Is 'slmops fleet serve' running there?{hint}") from exc
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        hint = " (pass --token or set SLMOPS_FLEET_TOKEN)" if r.status_code == 401 and not token else ""
        raise FleetError(f"fleet answered {r.status_code}: {detail}{hint}")
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
    expires_days: Annotated[Optional[int], typer.Option(
        "--expires-in-days", "--expires-days", min=1, max=3650, help="signature validity in days (default 90)")] = None,
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
    if (h := m.eval.heldout) is not None:
        need = f"at least {h.min_score:g}" if h.min_score is not None else "reported only"
        out.print(f"  held-out set {h.file}: devices score {h.metric} ({need})")


def _private_key(path: Path) -> PrivateKey:
    from protocol.trust import PrivateKey

    return PrivateKey.from_pem(_read(path))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


# `slmops fleet rollout ...`, `groups` and `tag` live in fleet/rollout_cli.py (importing it adds groups and tag).
from .rollout_cli import rollout_app as _rollout_app  # noqa: E402

app.add_typer(_rollout_app, name="rollout")
# `slmops fleet db ...` lives in fleet/db_cli.py, which imports _errors and out from here: wired last.
from .db_cli import app as _db_app  # noqa: E402

app.add_typer(_db_app, name="db")
