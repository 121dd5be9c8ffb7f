"""`slmops keys`: the fleet's trust folder (root, bundle and command keys; the chain of signed roots).

    init DIR      new root, bundle and command keys and root v1 (root/1.root.json and root.json)
    rotate DIR    the next root with new keys for a role (--role bundles|commands|root), keys removed, a threshold
    revoke DIR K  the next root without key K, which is listed as revoked for good
    show PATH     a trust folder's (or a root.json's) roles, key fingerprints, thresholds, expiry and version
    generate      a lone Ed25519 key pair (for `slmops bundle build --key` without a trust folder)

The work is done by fleet/trust.py; every new root is checked the way a device checks it before it is written.
Private keys are written 0600 and never overwritten. Give devices root.json (`slmops agent run --trust-root`); serve
the folder with `slmops fleet serve --trust-dir DIR` so devices can walk to later roots.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from protocol.errors import ConfigError

from .cli import _errors, out

app = typer.Typer(help="Trust root and Ed25519 keys: init, rotate, revoke, show, generate.", no_args_is_help=True)
DirArg = Annotated[Path, typer.Argument(help="trust folder")]
DaysOpt = Annotated[int, typer.Option("--expires-in-days", min=1, max=3650, help="days the new root is valid")]


@app.callback()
def _keys() -> None:
    """Trust root and Ed25519 keys: init, rotate, revoke, show, generate."""


@app.command()
def init(
    folder: DirArg,
    bundle_keys: Annotated[int, typer.Option(min=1, max=16, help="bundle signing keys")] = 1,
    bundle_threshold: Annotated[int, typer.Option(min=1, max=16, help="distinct bundle keys that must sign")] = 1,
    root_keys: Annotated[int, typer.Option(min=1, max=16, help="root keys (sign later roots)")] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, max=16, help="distinct root keys that must sign a root")] = 1,
    expires_in_days: DaysOpt = 365,
) -> None:
    """Make a trust folder: root, bundle and command keys (.key 0600, .pub) and root v1."""
    with _errors():
        from .trust import init_trust

        root = init_trust(folder, now=_now(), root_keys=root_keys, root_threshold=root_threshold,
                          bundle_keys=bundle_keys, bundle_threshold=bundle_threshold, expires_in_days=expires_in_days)
        out.print(f"wrote {folder}/root.json (v{root.version}); give it to devices (--trust-root) and keep the "
                  "root-*.key files offline")
        _table(root)


@app.command()
def rotate(
    folder: DirArg,
    role: Annotated[str, typer.Option(help="bundles | commands | root")],
    new: Annotated[Optional[int], typer.Option(min=0, max=16, help="new keys to add (default 1, 0 with --remove)")] = None,
    remove: Annotated[Optional[list[str]], typer.Option(help="key id to take out of the role; repeat")] = None,
    threshold: Annotated[Optional[int], typer.Option(min=1, max=16, help="the role's new threshold")] = None,
    expires_in_days: DaysOpt = 365,
) -> None:
    """Sign the next root with new keys for a role, signed by the old and the new root keys."""
    with _errors():
        from .trust import rotate_trust

        root = rotate_trust(folder, role=role, now=_now(), new=new, remove=remove or (), threshold=threshold,
                            expires_in_days=expires_in_days)
        out.print(f"wrote root v{root.version}; a running fleet serves it at once and signs commands with it")
        _table(root)


@app.command()
def revoke(
    folder: DirArg,
    keyid: Annotated[str, typer.Argument(help="the key id (64 hex digits) to revoke")],
    expires_in_days: DaysOpt = 365,
) -> None:
    """Sign the next root without a key, listing it as revoked: devices never count it again."""
    with _errors():
        from .trust import revoke_key

        root = revoke_key(folder, keyid.strip().lower(), now=_now(), expires_in_days=expires_in_days)
        out.print(f"wrote root v{root.version}: {keyid[:16]} revoked")
        _table(root)


@app.command()
def show(path: Annotated[Path, typer.Argument(help="trust folder or root.json")]) -> None:
    """Show a root: version, expiry, each role's key fingerprints and threshold, revoked keys."""
    with _errors():
        from .trust import read_root

        _table(read_root(path))


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for NAME.key and NAME.pub")],
    name: Annotated[str, typer.Option(help="file name stem")],
) -> None:
    """Write a new Ed25519 key pair: NAME.key (PKCS8 PEM, mode 0600) and NAME.pub (PEM). Never overwrites."""
    with _errors():
        from protocol.trust import generate_keypair

        from .trust import write_key

        key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
        existing = [str(p) for p in (key_path, pub_path) if p.exists()]
        if existing:
            raise ConfigError(f"{', '.join(existing)} already exist(s); choose another --name or --out")
        out_dir.mkdir(parents=True, exist_ok=True)
        key = generate_keypair()
        write_key(out_dir, name, key)
        out.print(f"wrote {key_path} (keep it secret) and {pub_path}; key id {key.keyid}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _table(root) -> None:
    out.print(f"[bold]trust root v{root.version}[/bold], expires {root.expires.isoformat()}")
    t = Table("role", "key id", "threshold")
    for name, role in root.roles.items():
        for i, k in enumerate(role.keyids):
            t.add_row(name if i == 0 else "", k[:16] + "…" + k[-4:], f"{role.threshold} of {len(role.keyids)}" if i == 0 else "")
    out.print(t)
    if root.revoked:
        out.print("revoked: " + ", ".join(sorted(k[:16] for k in root.revoked)))


keys_app = app  # the name `slmops` used before keys moved here
