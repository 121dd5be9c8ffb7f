"""The project's certificate authority: one folder, its whole lifecycle (make, issue, revoke, publish the CRL).

Workflow (each step takes the time `now` from the caller, so tests can issue in the past):
    init_ca(dir, name, now, days)              ca.key (0600) + ca.pem, an empty index.json
    issue_server(dir, names, now, days)        servers/<stem>.pem + .key: serverAuth, SAN = the DNS names and IPs
    issue_device(dir, device_id, now, days)    clients/<device id>.pem + .key: clientAuth, CN = the device id
    issue_fleet(dir, now, days, name)          clients/slmops-fleet.pem + .key: the fleet's own MQTT client identity
    revoke(dir, serial, now) / revoke_device   marks the certificate revoked in index.json
    write_crl(dir, now, days)                  crl.pem: every revoked certificate, signed by the CA, valid `days`
    read_index(dir)                            every certificate issued (serial, kind, subject, not_after, revoked_at)

Keys are ECDSA P-256 (what OpenSSL 3, mosquitto, Python's ssl, paho and browsers all accept for TLS); certificates
carry the key-identifier extensions strict X.509 checking asks for. A device certificate's common name is its
device id (`protocol.topics.check_device_id`), which mosquitto's `use_identity_as_username` turns into the MQTT
username; names starting with `slmops-fleet` belong to the fleet and are never given to a device. Private keys are
created 0600 with `os.open` and moved into place; index.json is read strictly (a damaged index is refused, never
guessed at) and rewritten with a temp file and `os.replace` under a lock, so two commands never lose an entry.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from protocol import topics
from protocol.errors import clip

from .errors import PkiError

CA_KEY, CA_CERT, INDEX, CRL, LOCK = "ca.key", "ca.pem", "index.json", "crl.pem", ".lock"
FLEET_PREFIX = "slmops-fleet"  # common names the fleet's own client certificates use; refused for devices
BACKDATE = timedelta(minutes=5)  # not_before this far before `now`, so a peer whose clock is a little behind accepts
MAX_DAYS = 3650  # days: the longest validity of a CA or certificate
MAX_CRL_DAYS = 366  # days: the longest a CRL may be published for before it must be written again
MAX_INDEX_BYTES = 16 << 20  # bytes: a larger index.json is refused as damaged
MAX_NAMES = 32  # DNS names + IPs in one server certificate
Kind = Literal["server", "device", "fleet"]

SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")  # lowercase hex, at most 160 bits (RFC 5280 allows 20 octets)
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_RE = re.compile(rf"{LABEL}(?:\.{LABEL})*")
STEM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUBJECT_RE = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}"  # device ids, DNS names and IPs all fit


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    serial: str = Field(pattern=rf"^{SERIAL_RE.pattern}$")
    kind: Kind
    subject: str = Field(pattern=rf"^{SUBJECT_RE}$")
    not_after: AwareDatetime = Field(strict=False)
    revoked_at: AwareDatetime | None = Field(default=None, strict=False)


class _Index(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal[1]
    crl_number: int = Field(ge=0, lt=1 << 63)
    certs: list[_Entry] = Field(max_length=1_000_000)


@dataclass(frozen=True)
class Issued:
    """One certificate the CA issued, as index.json records it."""

    serial: int
    kind: Kind
    subject: str  # the common name: a device id, the fleet's name, or a server's first name
    not_after: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class IssuedFiles:
    """A new certificate and where its PEM files were written."""

    issued: Issued
    cert_file: Path
    key_file: Path


# ---- the CA ---------------------------------------------------------------------------------------------------


def init_ca(ca_dir: Path, name: str, now: datetime, days: int = MAX_DAYS) -> Path:
    """Make a new CA in `ca_dir` (created if absent); refuses a folder that already holds one. Returns ca.pem."""
    now, days = _utc(now), _days(days, MAX_DAYS)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}", name):
        raise PkiError(f"CA name {clip(name)} is not valid: use 1-64 letters, digits, spaces, '.', '_', '-'")
    ca_dir.mkdir(parents=True, exist_ok=True)
    with _locked(ca_dir):
        existing = [p.name for p in (ca_dir / CA_KEY, ca_dir / CA_CERT, ca_dir / INDEX) if p.exists()]
        if existing:
            raise PkiError(f"{ca_dir} already holds a CA ({', '.join(existing)}); choose another folder")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(ca_dir / CA_KEY, key)
        _write_public(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
        _write_index(ca_dir, _Index(format=1, crl_number=0, certs=[]))
    return ca_dir / CA_CERT


def issue_server(ca_dir: Path, names: Sequence[str], now: datetime, days: int = 825, *, stem: str = "server") -> IssuedFiles:
    """A server certificate (serverAuth) for these DNS names and IP addresses, written to servers/<stem>.pem/.key."""
    if isinstance(names, str) or not names or len(names) > MAX_NAMES:
        raise PkiError(f"give 1-{MAX_NAMES} host names or IP addresses for a server certificate")
    sans: list[x509.GeneralName] = [_san(n) for n in names]
    if not isinstance(stem, str) or not STEM_RE.fullmatch(stem):
        raise PkiError(f"file name {clip(stem)} is not valid: use 1-64 letters, digits, '.', '_', '-'")
    return _issue(ca_dir, "server", str(names[0]), sans, ExtendedKeyUsageOID.SERVER_AUTH, now, days, ca_dir / "servers", stem)


def issue_device(ca_dir: Path, device_id: str, now: datetime, days: int = 825) -> IssuedFiles:
    """A device's client certificate (clientAuth, CN = its device id), written to clients/<device id>.pem/.key."""
    topics.check_device_id(device_id)
    if device_id.startswith(FLEET_PREFIX):
        raise PkiError(f"device id {clip(device_id)} starts with {FLEET_PREFIX!r}, which names the fleet; choose another id")
    return _issue(ca_dir, "device", device_id, [], ExtendedKeyUsageOID.CLIENT_AUTH, now, days, ca_dir / "clients", device_id)


def issue_fleet(ca_dir: Path, now: datetime, days: int = 825, *, name: str = FLEET_PREFIX) -> IssuedFiles:
    """The fleet's own client certificate (CN `slmops-fleet` or `slmops-fleet-<replica>`), for a TLS-only broker."""
    topics.check_device_id(name)
    if name != FLEET_PREFIX and not name.startswith(FLEET_PREFIX + "-"):
        raise PkiError(f"fleet name {clip(name)} must be {FLEET_PREFIX!r} or start with '{FLEET_PREFIX}-'")
    return _issue(ca_dir, "fleet", name, [], ExtendedKeyUsageOID.CLIENT_AUTH, now, days, ca_dir / "clients", name)


def revoke(ca_dir: Path, serial: int, now: datetime) -> Issued:
    """Mark one certificate revoked (kept as revoked at its first revocation time); write_crl publishes it."""
    now = _utc(now)
    with _locked(ca_dir):
        index = read_index_model(ca_dir)
        key = _serial_hex(serial)
        for i, e in enumerate(index.certs):
            if e.serial == key:
                if e.revoked_at is None:
                    index.certs[i] = e.model_copy(update={"revoked_at": now})
                    _write_index(ca_dir, index)
                return _issued(index.certs[i])
    raise PkiError(f"no certificate with serial {key} was issued by {ca_dir}; see 'slmops ca list'")


def revoke_device(ca_dir: Path, device_id: str, now: datetime) -> list[Issued]:
    """Revoke every unrevoked device certificate of this device id; returns those revoked now."""
    topics.check_device_id(device_id)
    now = _utc(now)
    with _locked(ca_dir):
        index = read_index_model(ca_dir)
        done: list[Issued] = []
        for i, e in enumerate(index.certs):
            if e.kind == "device" and e.subject == device_id and e.revoked_at is None:
                index.certs[i] = e.model_copy(update={"revoked_at": now})
                done.append(_issued(index.certs[i]))
        if done:
            _write_index(ca_dir, index)
    return done


def write_crl(ca_dir: Path, now: datetime, days: int = 7) -> Path:
    """Sign and write crl.pem listing every revoked certificate, valid until now + days. Write it again before
    then: a server that checks an expired CRL refuses every client."""
    now, days = _utc(now), _days(days, MAX_CRL_DAYS)
    with _locked(ca_dir):
        key, ca = _load_ca(ca_dir, now)
        index = read_index_model(ca_dir)
        index.crl_number += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(now)
            .next_update(now + timedelta(days=days))
            .add_extension(x509.CRLNumber(index.crl_number), critical=False)
            .add_extension(_aki(ca), critical=False)
        )
        for e in index.certs:
            if e.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(e.serial, 16)).revocation_date(e.revoked_at).build()
                )
        crl = builder.sign(key, hashes.SHA256())
        _write_index(ca_dir, index)
        _write_public(ca_dir / CRL, crl.public_bytes(serialization.Encoding.PEM))
    return ca_dir / CRL


def read_index(ca_dir: Path) -> list[Issued]:
    """Every certificate the CA issued, oldest first."""
    return [_issued(e) for e in read_index_model(ca_dir).certs]


def read_index_model(ca_dir: Path) -> _Index:
    path = ca_dir / INDEX
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError as exc:
        raise PkiError(f"{ca_dir} holds no CA ({INDEX} is missing); run 'slmops ca init' first") from exc
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_INDEX_BYTES:
        raise PkiError(f"{path} is larger than {MAX_INDEX_BYTES} bytes; it is damaged: restore it from a backup")
    try:
        index = _Index.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        where = exc.errors()[0]["loc"] if isinstance(exc, ValidationError) else "not JSON"
        raise PkiError(f"{path} is damaged ({clip(str(where), 80)}); restore it from a backup") from exc
    serials = [e.serial for e in index.certs]
    if len(set(serials)) != len(serials):
        raise PkiError(f"{path} names one serial twice; it is damaged: restore it from a backup")
    return index


# ---- inside ---------------------------------------------------------------------------------------------------


def _issue(
    ca_dir: Path, kind: Kind, cn: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
    now: datetime, days: int, out_dir: Path, stem: str,
) -> IssuedFiles:
    now, days = _utc(now), _days(days, MAX_DAYS)
    with _locked(ca_dir):
        ca_key, ca = _load_ca(ca_dir, now)
        not_after = now + timedelta(days=days)
        if not_after > ca.not_valid_after_utc:
            raise PkiError(
                f"the CA expires {ca.not_valid_after_utc.isoformat()}, before {days} days from now; "
                "issue for fewer days or make a new CA"
            )
        index = read_index_model(ca_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_aki(ca), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        entry = _Entry(serial=_serial_hex(serial), kind=kind, subject=cn, not_after=not_after)
        index.certs.append(entry)
        _write_index(ca_dir, index)  # recorded before the files exist: a certificate is never out of the index
        out_dir.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = out_dir / f"{stem}.key", out_dir / f"{stem}.pem"
        _write_private(key_file, key)
        _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return IssuedFiles(_issued(entry), cert_file, key_file)


def _load_ca(ca_dir: Path, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    try:
        mode = key_path.stat().st_mode
        key_pem, cert_pem = key_path.read_bytes(), cert_path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{ca_dir} holds no CA ({Path(exc.filename).name} is missing); run 'slmops ca init' first") from exc
    except OSError as exc:
        raise PkiError(f"cannot read the CA in {ca_dir}: {exc.strerror}") from exc
    if mode & 0o077:
        raise PkiError(f"{key_path} is readable by other users; run 'chmod 600 {key_path}' and check who copied it")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"the CA files in {ca_dir} are damaged or encrypted: {clip(str(exc), 80)}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} is not the key of {cert_path}; restore the pair from a backup")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise PkiError(
            f"the CA in {ca_dir} is valid {cert.not_valid_before_utc.isoformat()} to "
            f"{cert.not_valid_after_utc.isoformat()}, not now; make a new CA and reissue"
        )
    return key, cert


def _san(name: object) -> x509.GeneralName:
    if not isinstance(name, str) or len(name) > 253:
        raise PkiError(f"host name {clip(name)} is not valid")
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not DNS_RE.fullmatch(name):
        raise PkiError(f"host name {clip(name)} is neither an IP address nor a DNS name (letters, digits, '-', '.')")
    return x509.DNSName(name.lower())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _aki(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _issued(e: _Entry) -> Issued:
    return Issued(serial=int(e.serial, 16), kind=e.kind, subject=e.subject, not_after=e.not_after, revoked_at=e.revoked_at)


def _serial_hex(serial: object) -> str:
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 < serial < 1 << 160:
        raise PkiError(f"serial {clip(serial)} is not valid: a positive number of at most 160 bits")
    return format(serial, "x")


def _utc(now: datetime) -> datetime:
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise PkiError("the time given to the CA must be timezone-aware")
    return now.astimezone(timezone.utc).replace(microsecond=0)  # X.509 times have whole seconds


def _days(days: object, limit: int) -> int:
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= limit:
        raise PkiError(f"validity {clip(days)} days is not valid: give 1-{limit} days")
    return days


@contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    """One CA command at a time on this folder (flock; released when the process ends, even by a crash)."""
    if not ca_dir.is_dir():
        raise PkiError(f"{ca_dir} is not a folder holding a CA; run 'slmops ca init' first")
    fd = os.open(ca_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_index(ca_dir: Path, index: _Index) -> None:
    _write_public(ca_dir / INDEX, (index.model_dump_json(indent=1) + "\n").encode())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _replace(path, pem, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _replace(path, data, 0o644)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a new file created with `mode` (never widened) beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
