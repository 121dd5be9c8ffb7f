"""The project CA (fleet/pki.py) and `slmops ca`: what it writes, what it refuses, and that a refusal changes nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError
from typer.testing import CliRunner

from fleet import pki
from fleet.ca_cli import app as ca_app
from fleet.errors import PkiError
from fleet.settings import Settings
from protocol.errors import TopicError

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    pki.init_ca(d, "test CA", NOW, days=365)
    return d


def _tree(d: Path) -> dict[str, bytes]:
    """Every file under the CA folder (but the lock) and its bytes: the CA's whole state."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != pki.LOCK}


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_private_keys_are_0600_and_certificates_say_who_and_what_for(ca: Path) -> None:
    server = pki.issue_server(ca, ["broker.example", "127.0.0.1", "::1"], NOW, 30)
    device = pki.issue_device(ca, "pump-17", NOW, 30)
    fleet = pki.issue_fleet(ca, NOW, 30)
    for key in (ca / "ca.key", server.key_file, device.key_file, fleet.key_file):
        assert _mode(key) == 0o600, key
    for cert in (ca / "ca.pem", server.cert_file, device.cert_file, ca / "index.json"):
        assert _mode(cert) & 0o022 == 0, cert  # nobody else may write them

    dev = x509.load_pem_x509_certificate(device.cert_file.read_bytes())
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pump-17"
    assert list(dev.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert dev.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert dev.not_valid_after_utc == NOW + timedelta(days=30)
    assert dev.serial_number == device.issued.serial

    srv = x509.load_pem_x509_certificate(server.cert_file.read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert list(srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]

    assert [(i.kind, i.subject) for i in pki.read_index(ca)] == [("server", "broker.example"), ("device", "pump-17"), ("fleet", "slmops-fleet")]


@pytest.mark.parametrize(
    "call, error",
    [
        pytest.param(lambda d: pki.issue_device(d, "a/b", NOW, 30), TopicError, id="device-id-with-slash"),
        pytest.param(lambda d: pki.issue_device(d, "+", NOW, 30), TopicError, id="device-id-wildcard"),
        pytest.param(lambda d: pki.issue_device(d, "pump\n", NOW, 30), TopicError, id="device-id-newline"),
        pytest.param(lambda d: pki.issue_device(d, "x" * 129, NOW, 30), TopicError, id="device-id-too-long"),
        pytest.param(lambda d: pki.issue_device(d, "", NOW, 30), TopicError, id="device-id-empty"),
        pytest.param(lambda d: pki.issue_device(d, "slmops-fleet", NOW, 30), PkiError, id="device-takes-fleet-name"),
        pytest.param(lambda d: pki.issue_device(d, "slmops-fleet-2", NOW, 30), PkiError, id="device-takes-replica-name"),
        pytest.param(lambda d: pki.issue_fleet(d, NOW, 30, name="pump-17"), PkiError, id="fleet-takes-device-name"),
        pytest.param(lambda d: pki.issue_server(d, ["bad host"], NOW, 30), PkiError, id="server-name-with-space"),
        pytest.param(lambda d: pki.issue_server(d, ["*.example"], NOW, 30), PkiError, id="server-wildcard"),
        pytest.param(lambda d: pki.issue_server(d, [], NOW, 30), PkiError, id="server-no-names"),
        pytest.param(lambda d: pki.issue_server(d, "localhost", NOW, 30), PkiError, id="server-names-a-string"),
        pytest.param(lambda d: pki.issue_server(d, ["ok"], NOW, 30, stem="../x"), PkiError, id="server-stem-escapes"),
        pytest.param(lambda d: pki.issue_device(d, "pump-17", NOW, 366), PkiError, id="outlives-the-ca"),
        pytest.param(lambda d: pki.issue_device(d, "pump-17", NOW, 0), PkiError, id="zero-days"),
        pytest.param(lambda d: pki.issue_device(d, "pump-17", NOW + timedelta(days=400), 1), PkiError, id="ca-expired"),
        pytest.param(lambda d: pki.issue_device(d, "pump-17", NOW.replace(tzinfo=None), 30), PkiError, id="naive-clock"),
        pytest.param(lambda d: pki.revoke(d, 12345, NOW), PkiError, id="revoke-unknown-serial"),
        pytest.param(lambda d: pki.revoke(d, -1, NOW), PkiError, id="revoke-negative-serial"),
        pytest.param(lambda d: pki.revoke(d, 1 << 160, NOW), PkiError, id="revoke-serial-over-160-bits"),
        pytest.param(lambda d: pki.write_crl(d, NOW, 400), PkiError, id="crl-too-long"),
        pytest.param(lambda d: pki.init_ca(d, "again", NOW, 30), PkiError, id="init-over-existing-ca"),
    ],
)
def test_refusals_change_nothing(ca: Path, call, error: type[Exception]) -> None:
    pki.issue_device(ca, "pump-17", NOW, 30)
    before = _tree(ca)
    with pytest.raises(error):
        call(ca)
    assert _tree(ca) == before


def test_a_ca_key_readable_by_others_is_refused(ca: Path) -> None:
    os.chmod(ca / "ca.key", 0o644)
    before = _tree(ca)
    with pytest.raises(PkiError, match="readable by other users"):
        pki.issue_device(ca, "pump-17", NOW, 30)
    assert _tree(ca) == before


def _entry(**over: object) -> dict:
    e = {"serial": "1f", "kind": "device", "subject": "pump-17", "not_after": "2027-01-01T00:00:00Z", "revoked_at": None}
    return {**e, **over}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(json.dumps([]).encode(), id="a-list"),
        pytest.param(json.dumps({"format": 2, "crl_number": 0, "certs": []}).encode(), id="unknown-format"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [], "x": 1}).encode(), id="extra-field"),
        pytest.param(json.dumps({"format": 1, "crl_number": -1, "certs": []}).encode(), id="negative-crl-number"),
        pytest.param(json.dumps({"format": 1, "crl_number": 1 << 63, "certs": []}).encode(), id="crl-number-over-63-bits"),
        pytest.param(json.dumps({"format": 1, "crl_number": "1", "certs": []}).encode(), id="crl-number-a-string"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(serial="1F")]}).encode(), id="serial-uppercase"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(serial="1" * 41)]}).encode(), id="serial-over-160-bits"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(serial=31)]}).encode(), id="serial-a-number"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(), _entry()]}).encode(), id="serial-twice"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(kind="admin")]}).encode(), id="unknown-kind"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(subject="pump\n17")]}).encode(), id="subject-newline"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(not_after="2027-01-01T00:00:00")]}).encode(), id="naive-time"),
        pytest.param(json.dumps({"format": 1, "crl_number": 0, "certs": [_entry(extra=1)]}).encode(), id="entry-extra-field"),
        pytest.param(b" " * (pki.MAX_INDEX_BYTES + 1), id="too-large"),
    ],
)
def test_a_damaged_index_is_refused_and_left_alone(ca: Path, content: bytes) -> None:
    (ca / "index.json").write_bytes(content)
    before = _tree(ca)
    with pytest.raises(PkiError, match="index.json"):
        pki.read_index(ca)
    with pytest.raises(PkiError, match="index.json"):
        pki.issue_device(ca, "pump-17", NOW, 30)
    assert _tree(ca) == before


def test_revoke_keeps_the_first_time_and_the_crl_lists_exactly_the_revoked(ca: Path) -> None:
    keep = pki.issue_device(ca, "pump-1", NOW, 30)
    gone = pki.issue_device(ca, "pump-2", NOW, 30)
    again = pki.issue_device(ca, "pump-2", NOW, 30)  # a second certificate of the same device
    assert pki.revoke(ca, gone.issued.serial, NOW).revoked_at == NOW
    assert pki.revoke(ca, gone.issued.serial, NOW + timedelta(hours=1)).revoked_at == NOW
    assert [i.serial for i in pki.revoke_device(ca, "pump-2", NOW)] == [again.issued.serial]
    pki.write_crl(ca, NOW, 7)
    crl = x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())
    assert {r.serial_number for r in crl} == {gone.issued.serial, again.issued.serial}
    assert crl.get_revoked_certificate_by_serial_number(keep.issued.serial) is None
    assert crl.next_update_utc == NOW + timedelta(days=7)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    assert crl.is_signature_valid(ca_cert.public_key())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    pki.write_crl(ca, NOW, 7)
    assert x509.load_pem_x509_crl((ca / "crl.pem").read_bytes()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1


def test_cli_makes_a_ca_issues_revokes_and_lists(tmp_path: Path) -> None:
    runner, d = CliRunner(), str(tmp_path / "ca")
    for args in (["init", "--dir", d], ["server", "--dir", d, "--host", "localhost"], ["device", "pump-17", "--dir", d]):
        r = runner.invoke(ca_app, args)
        assert r.exit_code == 0, r.output
    assert _mode(tmp_path / "ca" / "clients" / "pump-17.key") == 0o600
    r = runner.invoke(ca_app, ["revoke", "--dir", d, "--device", "pump-17"])
    assert r.exit_code == 0 and "revoked device pump-17" in r.output, r.output
    r = runner.invoke(ca_app, ["crl", "--dir", d])
    assert r.exit_code == 0 and "1 revoked" in r.output, r.output
    r = runner.invoke(ca_app, ["list", "--dir", d])
    assert r.exit_code == 0 and "revoked" in r.output and "valid" in r.output, r.output
    before = _tree(tmp_path / "ca")
    for bad in (["device", "a/b", "--dir", d], ["revoke", "--dir", d, "--serial", "xyz"], ["init", "--dir", d]):
        r = runner.invoke(ca_app, bad)
        assert r.exit_code == 2 and "error" in r.output, (bad, r.output)
    assert _tree(tmp_path / "ca") == before


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param({"tls_cert_file": Path("c.pem")}, id="cert-without-key"),
        pytest.param({"tls_key_file": Path("k.pem")}, id="key-without-cert"),
        pytest.param({"tls_client_ca_file": Path("ca.pem")}, id="client-ca-without-https"),
        pytest.param({"tls_cert_file": Path("c"), "tls_key_file": Path("k"), "tls_crl_file": Path("crl")}, id="crl-without-client-ca"),
    ],
)
def test_settings_refuse_half_a_tls_setup(tmp_path: Path, tls: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, **tls)


def test_settings_public_url_is_https_when_tls_is_on(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, port=8443, tls_cert_file=Path("c.pem"), tls_key_file=Path("k.pem"))
    assert s.public_url == "https://127.0.0.1:8443"
    assert s.bundle_url("m", 1).startswith("https://")
    assert Settings(data_dir=tmp_path, port=8443).public_url == "http://127.0.0.1:8443"
