"""`slmops ca`: the project CA on this machine (fleet/pki.py), for TLS on the broker and the fleet's HTTP.

    init      make a CA folder: ca.key (0600), ca.pem, index.json
    server    a server certificate for mosquitto or the fleet (DNS names and IPs it answers on)
    device    a device's client certificate (CN = device id, the broker username with use_identity_as_username)
    fleet     the fleet's own client certificate for a broker that requires certificates
    revoke    mark a certificate revoked, by --serial or every one of a --device
    crl       write crl.pem (publish it to mosquitto's crlfile and the fleet's --tls-crl, again before it expires)
    list      every certificate issued, with its state

Every command takes the folder as --dir (env SLMOPS_CA_DIR, default ./ca) and reads the clock once.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from protocol.errors import ConfigError

from .cli import _errors, out
from .pki import IssuedFiles

app = typer.Typer(help="The project CA: TLS certificates for the broker, the fleet and each device.", no_args_is_help=True)

DirOpt = Annotated[Path, typer.Option("--dir", help="the CA folder (env SLMOPS_CA_DIR)")]
DEFAULT_DIR = Path(os.environ.get("SLMOPS_CA_DIR", "ca"))
DaysOpt = Annotated[int, typer.Option(help="days the certificate is valid")]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _show(files: IssuedFiles) -> None:
    i = files.issued
    out.print(f"{i.kind} certificate for [bold]{escape(i.subject)}[/bold], serial {i.serial:x}, valid until {i.not_after.isoformat()}")
    out.print(f"  {files.cert_file}\n  {files.key_file} (private, mode 0600: copy it only to where it is used)")


@app.command()
def init(
    ca_dir: DirOpt = DEFAULT_DIR,
    name: Annotated[str, typer.Option(help="the CA's common name")] = "slmops project CA",
    days: DaysOpt = 3650,
) -> None:
    """Make a new CA (never overwrites one)."""
    with _errors():
        from .pki import init_ca

        path = init_ca(ca_dir, name, _now(), days)
        out.print(f"CA '{escape(name)}' made: {path} (give it to every client and server), {ca_dir / 'ca.key'} (keep it secret)")


@app.command()
def server(
    host: Annotated[list[str], typer.Option(help="DNS name or IP address clients connect to; repeat for several")],
    ca_dir: DirOpt = DEFAULT_DIR,
    name: Annotated[str, typer.Option(help="file name stem under servers/")] = "server",
    days: DaysOpt = 825,
) -> None:
    """Issue a server certificate (mosquitto's certfile/keyfile, the fleet's --tls-cert/--tls-key)."""
    with _errors():
        from .pki import issue_server

        _show(issue_server(ca_dir, host, _now(), days, stem=name))


@app.command()
def device(
    device_id: Annotated[str, typer.Argument(help="the device id (becomes the certificate's CN)")],
    ca_dir: DirOpt = DEFAULT_DIR,
    days: DaysOpt = 825,
) -> None:
    """Issue a device's client certificate."""
    with _errors():
        from .pki import issue_device

        _show(issue_device(ca_dir, device_id, _now(), days))


@app.command()
def fleet(
    ca_dir: DirOpt = DEFAULT_DIR,
    name: Annotated[str, typer.Option(help="slmops-fleet, or slmops-fleet-<replica>")] = "slmops-fleet",
    days: DaysOpt = 825,
) -> None:
    """Issue the fleet's own client certificate."""
    with _errors():
        from .pki import issue_fleet

        _show(issue_fleet(ca_dir, _now(), days, name=name))


@app.command()
def revoke(
    ca_dir: DirOpt = DEFAULT_DIR,
    serial: Annotated[Optional[str], typer.Option(help="hex serial, as 'slmops ca list' shows it")] = None,
    device_id: Annotated[Optional[str], typer.Option("--device", help="revoke every certificate of this device")] = None,
) -> None:
    """Revoke a certificate; then run 'slmops ca crl' and publish crl.pem."""
    with _errors():
        from .pki import revoke as revoke_serial
        from .pki import revoke_device

        if (serial is None) == (device_id is None):
            raise ConfigError("give exactly one of --serial and --device")
        if serial is not None:
            if not 1 <= len(serial) <= 40 or any(c not in "0123456789abcdefABCDEF" for c in serial):
                raise ConfigError("--serial is a hex number of 1-40 digits, as 'slmops ca list' shows it")
            done = [revoke_serial(ca_dir, int(serial, 16), _now())]
        else:
            done = revoke_device(ca_dir, device_id, _now())  # type: ignore[arg-type]
            if not done:
                out.print(f"device {escape(device_id or '')} has no unrevoked certificate")
        for i in done:
            out.print(f"revoked {i.kind} {escape(i.subject)} serial {i.serial:x} at {i.revoked_at.isoformat() if i.revoked_at else '-'}")
        out.print("now run 'slmops ca crl' and publish crl.pem to the broker and the fleet, then send each SIGHUP")


@app.command()
def crl(ca_dir: DirOpt = DEFAULT_DIR, days: Annotated[int, typer.Option(help="days until it must be written again")] = 7) -> None:
    """Write crl.pem, signed by the CA, listing every revoked certificate."""
    with _errors():
        from .pki import read_index, write_crl

        path = write_crl(ca_dir, _now(), days)
        revoked = sum(1 for i in read_index(ca_dir) if i.revoked_at is not None)
        out.print(f"wrote {path}: {revoked} revoked certificate(s), valid {days} day(s); write it again before then")


@app.command("list")
def list_(ca_dir: DirOpt = DEFAULT_DIR) -> None:
    """Every certificate the CA issued."""
    with _errors():
        from .pki import read_index

        now = _now()
        table = Table()
        for column in ("serial", "kind", "subject", "not after", "state"):
            table.add_column(column, overflow="fold")
        for i in read_index(ca_dir):
            state = (
                f"[red]revoked {i.revoked_at.isoformat()}[/red]" if i.revoked_at
                else "[yellow]expired[/yellow]" if i.not_after <= now else "[green]valid[/green]"
            )
            table.add_row(f"{i.serial:x}", i.kind, escape(i.subject), i.not_after.isoformat(), state)
        out.print(table)
