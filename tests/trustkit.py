"""A fleet's trust material for tests: root keys, bundle keys, a command key, and the chain of signed roots.

`TrustKit()` signs root v1 with real Ed25519 keys; `rotate(...)` signs the next root with the old and new root keys;
`sign(cmd)` signs a command as the fleet does (with the current root's version); `fetch(n)` serves root n like
`GET /api/v1/trust/root/{n}.json` (None when absent)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from protocol.messages import _Message
from protocol.root import Root, load_trusted_root, root_signed, sign_root
from protocol.trust import PrivateKey, generate_keypair, sign_message

ORIGIN = "http://127.0.0.1:8700"


class TrustKit:
    def __init__(self, *, bundle_keys: int = 1, bundle_threshold: int = 1, days: int = 365) -> None:
        self.root_keys = [generate_keypair()]
        self.bundle_keys = [generate_keypair() for _ in range(bundle_keys)]
        self.bundle_threshold = bundle_threshold
        self.command_key = generate_keypair()
        self.revoked: list[str] = []
        self.expires = datetime.now(timezone.utc) + timedelta(days=days)
        self.roots: dict[int, bytes] = {}
        self._sign_next(self.root_keys)

    @property
    def version(self) -> int:
        return max(self.roots)

    @property
    def root(self) -> Root:
        return load_trusted_root(self.roots[self.version])

    def _signed(self, version: int) -> dict:
        keys = {k.keyid: k.public for k in (*self.root_keys, *self.bundle_keys, self.command_key)}
        return root_signed(
            version=version, expires=self.expires, keys=keys.values(),
            roles={"root": ([k.keyid for k in self.root_keys], 1),
                   "bundles": ([k.keyid for k in self.bundle_keys], self.bundle_threshold),
                   "commands": ([self.command_key.keyid], 1)},
            revoked=self.revoked,
        )

    def _sign_next(self, signers: list[PrivateKey]) -> bytes:
        version = (max(self.roots) + 1) if self.roots else 1
        self.roots[version] = sign_root(self._signed(version), signers)
        return self.roots[version]

    def rotate(self, *, root: bool = False, bundles: bool = False, commands: bool = False, revoke: bool = False) -> bytes:
        """The next root with new keys for the named roles (the old keys revoked with `revoke`), signed by the old
        and the new root keys."""
        old_root = list(self.root_keys)
        if revoke:
            self.revoked += [k.keyid for k in (*(old_root if root else ()), *(self.bundle_keys if bundles else ()),
                                                 *((self.command_key,) if commands else ()))]
        if root:
            self.root_keys = [generate_keypair()]
        if bundles:
            self.bundle_keys = [generate_keypair() for _ in self.bundle_keys]
        if commands:
            self.command_key = generate_keypair()
        return self._sign_next([*old_root, *self.root_keys])

    def write_root(self, path: Path, version: int | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.roots[version or 1])
        return path

    def fetch(self, version: int) -> bytes | None:
        return self.roots.get(version)

    def sign(self, cmd: _Message, *, key: PrivateKey | None = None) -> _Message:
        cmd = cmd.model_copy(update={"root_version": self.version})
        return sign_message(cmd, [key or self.command_key])
