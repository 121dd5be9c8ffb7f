"""The trust root: provisioning, rotation, chain walking and revocation, python-tuf style.

A small in-memory repository (`Repo`) signs real roots with real Ed25519 keys; each refusal is one table row that
names the typed error AND checks what the device trusts afterwards (still the root it had)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from protocol.errors import BadVersionNumberError, ExpiredMetadataError, RootError, SignatureError, SlmopsError
from protocol.manifest import canonical_bytes
from protocol.messages import BundleRef, CancelCommand, DeployCommand
from protocol.root import (
    MAX_ROOT_BYTES,
    Root,
    load_trusted_root,
    parse_root,
    root_signed,
    sign_root,
    verify_next_root,
    walk_chain,
)
from protocol.trust import Keyring, generate_keypair, sign_message, verify_message

NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
LATER = NOW + timedelta(days=365)
K = {name: generate_keypair() for name in ("r1", "r2", "r3", "r4", "b1", "b2", "b3", "c1", "c2", "x")}


def signed(version=1, *, root=("r1",), root_t=1, bundles=("b1",), bundles_t=1, commands=("c1",), revoked=(),
           expires=LATER, extra=()) -> dict:
    names = {*root, *bundles, *commands, *extra}
    return root_signed(
        version=version, expires=expires, keys=[K[n].public for n in sorted(names)],
        roles={"root": ([K[n].keyid for n in root], root_t), "bundles": ([K[n].keyid for n in bundles], bundles_t),
               "commands": ([K[n].keyid for n in commands], 1)},
        revoked=[K[n].keyid for n in revoked],
    )


def sign(doc: dict, *signers: str) -> bytes:
    return sign_root(doc, [K[n] for n in signers])


def raw(doc: dict, sigs: list[dict]) -> bytes:
    """An envelope built by hand (to break rules `root_signed` would refuse)."""
    return canonical_bytes({"signed": doc, "signatures": sigs})


def sig(doc: dict, name: str) -> dict:
    return {"keyid": K[name].keyid, "sig": K[name].key.sign(canonical_bytes(doc)).hex()}


@pytest.fixture()
def v1() -> Root:
    return load_trusted_root(sign(signed(1), "r1"), NOW)


# ---- provisioning -----------------------------------------------------------------------------------------------


def test_provisioned_root_gives_the_role_keyrings() -> None:
    root = load_trusted_root(sign(signed(1, bundles=("b1", "b2", "b3"), bundles_t=2), "r1"), NOW)
    ring = root.keyring("bundles")
    assert {k.keyid for k in ring.keys} == {K["b1"].keyid, K["b2"].keyid, K["b3"].keyid} and ring.threshold == 2
    assert [k.keyid for k in root.keyring("commands").keys] == [K["c1"].keyid]
    assert root.version == 1 and root.expires == LATER.replace(microsecond=0)


def _edit(path: tuple, value) -> bytes:
    doc = signed(1)
    target = doc
    for k in path[:-1]:
        target = target[k]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return raw(doc, [sig(doc, "r1")])


DELETE = object()
R1 = K["r1"].keyid


@pytest.mark.parametrize(("data", "error"), [
    pytest.param(lambda: sign(signed(1), "x"), SignatureError, id="signed_by_a_key_outside_the_root_role"),
    pytest.param(lambda: raw(signed(1), []), SignatureError, id="unsigned"),
    pytest.param(lambda: sign(signed(1, root=("r1", "r2"), root_t=2), "r1"), SignatureError, id="below_threshold"),
    pytest.param(lambda: raw(d := signed(1, root=("r1", "r2"), root_t=2), [sig(d, "r1")] * 2),
                 SignatureError, id="one_key_twice_is_one_signature"),
    pytest.param(lambda: sign(signed(1, expires=NOW - timedelta(seconds=1)), "r1"), ExpiredMetadataError, id="expired"),
    pytest.param(lambda: raw({**signed(1), "expires": "2099-01-01T00:00:00Z"}, [sig(signed(1), "r1")]), SignatureError,
                 id="field_changed_after_signing"),
    pytest.param(lambda: _edit(("version",), True), RootError, id="version_bool"),
    pytest.param(lambda: _edit(("version",), 2**63), RootError, id="version_past_63_bits"),
    pytest.param(lambda: _edit(("version",), "1"), RootError, id="version_string"),
    pytest.param(lambda: _edit(("_type",), "targets"), RootError, id="wrong_type"),
    pytest.param(lambda: _edit(("spec_version",), 2), RootError, id="unknown_spec_version"),
    pytest.param(lambda: _edit(("expires",), "2027-01-01T00:00:00+00:00"), RootError, id="expires_not_z"),
    pytest.param(lambda: _edit(("expires",), "2027-02-30T00:00:00Z"), RootError, id="expires_not_a_date"),
    pytest.param(lambda: _edit(("expires",), "2027-01-01T00:00:00Z\n"), RootError, id="expires_trailing_newline"),
    pytest.param(lambda: _edit(("keys", R1, "keytype"), "rsa"), RootError, id="unknown_keytype"),
    pytest.param(lambda: _edit(("keys", R1, "public"), "AB" * 32), RootError, id="public_uppercase_hex"),
    pytest.param(lambda: _edit(("keys", R1, "public"), K["x"].public.key.public_bytes_raw().hex()), RootError,
                 id="key_id_not_its_keys_sha256"),
    pytest.param(lambda: _edit(("keys", R1, "extra"), 1), RootError, id="key_extra_field"),
    pytest.param(lambda: _edit(("roles", "root", "threshold"), 2), RootError, id="threshold_above_key_count"),
    pytest.param(lambda: _edit(("roles", "root", "threshold"), 0), RootError, id="threshold_zero"),
    pytest.param(lambda: _edit(("roles", "root", "keyids"), [R1, R1]), RootError, id="role_lists_a_key_twice"),
    pytest.param(lambda: _edit(("roles", "root", "keyids"), [K["x"].keyid]), RootError, id="role_key_not_in_keys"),
    pytest.param(lambda: _edit(("roles", "root", "keyids"), [R1.upper()]), RootError, id="role_keyid_uppercase"),
    pytest.param(lambda: _edit(("roles", "targets"), {"keyids": [R1], "threshold": 1}), RootError, id="unknown_role"),
    pytest.param(lambda: _edit(("roles", "commands"), DELETE), RootError, id="missing_role"),
    pytest.param(lambda: _edit(("revoked",), [R1]), RootError, id="revoked_key_in_a_role"),
    pytest.param(lambda: _edit(("revoked",), ["0" * 63]), RootError, id="revoked_not_a_keyid"),
    pytest.param(lambda: _edit(("extra",), 1), RootError, id="unknown_field"),
    pytest.param(lambda: _edit(("keys",), {}), RootError, id="no_keys"),
    pytest.param(lambda: b"{" * 100_000, RootError, id="deep_nesting"),
    pytest.param(lambda: b" " * (MAX_ROOT_BYTES + 1), RootError, id="too_large"),
    pytest.param(lambda: b"\xff\xfe", RootError, id="not_utf8"),
    pytest.param(lambda: b'{"signed": {}, "signatures": [], "x": 1}', RootError, id="envelope_extra_field"),
    pytest.param(lambda: raw(signed(1), [{"keyid": R1, "sig": "zz"}]), RootError, id="signature_not_hex"),
    pytest.param(lambda: raw(signed(1), [{"keyid": R1}]), RootError, id="signature_without_sig"),
])
def test_provisioned_root_refused(data, error) -> None:
    with pytest.raises(error):
        load_trusted_root(data(), NOW)


# ---- rotation ---------------------------------------------------------------------------------------------------


def test_rotation_signed_by_old_and_new_root_keys_is_accepted(v1) -> None:
    v2 = verify_next_root(v1, sign(signed(2, root=("r2",), bundles=("b2",)), "r1", "r2"))
    assert v2.version == 2 and [k.keyid for k in v2.keyring("bundles").keys] == [K["b2"].keyid]


ROTATIONS = [
    # (id, new signed doc, signers, error)
    ("not_signed_by_old_root", dict(version=2, root=("r2",)), ("r2",), SignatureError),
    ("not_signed_by_new_root", dict(version=2, root=("r2",)), ("r1",), SignatureError),
    ("new_threshold_not_met", dict(version=2, root=("r1", "r2"), root_t=2), ("r1",), SignatureError),
    ("version_jump", dict(version=3), ("r1",), BadVersionNumberError),
    ("same_version", dict(version=1, bundles=("b2",)), ("r1",), BadVersionNumberError),
    ("signed_by_a_bundle_key", dict(version=2), ("b1",), SignatureError),
]


@pytest.mark.parametrize(("doc", "signers", "error"), [pytest.param(d, s, e, id=i) for i, d, s, e in ROTATIONS])
def test_rotation_refused(v1, doc, signers, error) -> None:
    trusted = v1
    with pytest.raises(error):
        trusted = verify_next_root(trusted, sign(signed(**doc), *signers))
    assert trusted is v1 and trusted.keyring("bundles").keys[0].keyid == K["b1"].keyid


def test_old_root_threshold_counts_distinct_old_keys() -> None:
    v1 = load_trusted_root(sign(signed(1, root=("r1", "r2"), root_t=2), "r1", "r2"), NOW)
    with pytest.raises(SignatureError):  # a threshold of the OLD role: r1 + r3 (r3 only in the new one) is not it
        verify_next_root(v1, sign(signed(2, root=("r1", "r3"), root_t=1), "r1", "r3"))
    assert verify_next_root(v1, sign(signed(2, root=("r1", "r3"), root_t=1), "r1", "r2")).version == 2


def test_replayed_old_root_is_refused(v1) -> None:
    old = sign(signed(1), "r1")
    v2 = verify_next_root(v1, sign(signed(2, bundles=("b2",)), "r1"))
    with pytest.raises(BadVersionNumberError):
        verify_next_root(v2, old)
    with pytest.raises(BadVersionNumberError):
        verify_next_root(v2, sign(signed(2, bundles=("b3",)), "r1"))  # an equal version, other content


# ---- revocation -------------------------------------------------------------------------------------------------


@pytest.fixture()
def revoked_r2() -> Root:
    """v2 of a chain whose v1 root role was r1+r2 (1 of 2), with r2 revoked in v2."""
    v1 = load_trusted_root(sign(signed(1, root=("r1", "r2")), "r1"), NOW)
    return verify_next_root(v1, sign(signed(2, root=("r1",), revoked=("r2",), extra=()), "r1"))


REVOCATIONS = [
    ("revoked_key_signs_alone", lambda: sign(signed(3, root=("r1", "r3"), revoked=("r2",)), "r2", "r3"), SignatureError),
    ("revoked_key_back_in_a_role",
     lambda: raw(d := {**signed(3, root=("r1", "r2")), "revoked": []}, [sig(d, "r1")]), RootError),
    ("revoked_key_back_in_keys",
     lambda: raw(d := {**signed(3, revoked=("r2",))} | {"keys": {**signed(3)["keys"], **signed(3, root=("r2",))["keys"]}},
                 [sig(d, "r1")]), RootError),
    ("revoked_list_dropped", lambda: sign(signed(3), "r1"), RootError),
]


@pytest.mark.parametrize(("data", "error"), [pytest.param(d, e, id=i) for i, d, e in REVOCATIONS])
def test_revoked_key_never_counts_nor_returns(revoked_r2, data, error) -> None:
    trusted = revoked_r2
    with pytest.raises(error):
        trusted = verify_next_root(trusted, data())
    assert trusted is revoked_r2 and trusted.revoked == {K["r2"].keyid}


def test_revoked_key_is_not_counted_towards_the_threshold(revoked_r2) -> None:
    """r2 revoked, r3 new: the old role needs r1 (r2 does not count), the new role 2 of r1, r3, r4."""
    doc = signed(3, root=("r1", "r3", "r4"), root_t=2, revoked=("r2",))
    with pytest.raises(SignatureError):
        verify_next_root(revoked_r2, sign(doc, "r2", "r3"))
    assert verify_next_root(revoked_r2, sign(doc, "r1", "r3")).version == 3


# ---- walking the chain ------------------------------------------------------------------------------------------


def chain(*docs: tuple[dict, tuple[str, ...]]) -> dict[int, bytes]:
    return {d["version"]: sign(d, *s) for d, s in docs}


def test_walk_of_three_rotations(v1) -> None:
    served = chain((signed(2, root=("r2",), expires=NOW - timedelta(days=1)), ("r1", "r2")),  # expired: only passed
                   (signed(3, root=("r3",), bundles=("b2",)), ("r2", "r3")),
                   (signed(4, root=("r3", "r4"), root_t=2, bundles=("b3",), commands=("c2",)), ("r3", "r4")))
    asked, stored = [], []
    final = walk_chain(v1, lambda n: asked.append(n) or served.get(n), now=NOW, on_step=stored.append)
    assert final.version == 4 and asked == [2, 3, 4, 5] and [r.version for r in stored] == [2, 3, 4]
    assert [k.keyid for k in final.keyring("commands").keys] == [K["c2"].keyid]


WALKS = [
    # (id, served roots, error, version the device trusts afterwards (stored through on_step))
    ("expired_final_root", lambda: chain((signed(2, expires=NOW), ("r1",))), ExpiredMetadataError, 2),
    ("bad_step_in_the_middle", lambda: chain((signed(2, root=("r2",)), ("r1", "r2")), (signed(3), ("r1",))),
     SignatureError, 2),
    ("server_answers_with_the_wrong_version", lambda: {2: sign(signed(3), "r1")}, BadVersionNumberError, 1),
    ("server_answers_garbage", lambda: {2: b"<html>"}, RootError, 1),
]


@pytest.mark.parametrize(("served", "error", "trusted_after"), [pytest.param(s, e, v, id=i) for i, s, e, v in WALKS])
def test_walk_refused(v1, served, error, trusted_after) -> None:
    roots = served()
    stored = [v1]
    with pytest.raises(error):
        walk_chain(v1, roots.get, now=NOW, on_step=stored.append)
    assert stored[-1].version == trusted_after


def test_walk_stops_after_max_steps(v1) -> None:
    served = {n: sign(signed(n), "r1") for n in range(2, 10)}
    assert walk_chain(v1, served.get, now=NOW, max_steps=3).version == 4


def test_expired_trusted_root_with_nothing_newer_is_refused() -> None:
    old = load_trusted_root(sign(signed(1, expires=NOW + timedelta(days=1)), "r1"))
    with pytest.raises(ExpiredMetadataError):
        walk_chain(old, lambda n: None, now=NOW + timedelta(days=2))


# ---- signed commands --------------------------------------------------------------------------------------------


def _deploy(**kw) -> DeployCommand:
    ref = BundleRef(name="triage", version=2, url="http://f/api/v1/bundles/triage/2/file", sha256="0" * 64, size=10)
    return DeployCommand(deployment_id="d1", device_id="dev-1", bundle=ref, sent_at=NOW, seq=5, **kw)


COMMANDS = [
    ("unsigned", lambda c: c, SignatureError),
    ("wrong_key", lambda c: sign_message(c, [K["x"]]), SignatureError),
    ("bundle_key_signs_a_command", lambda c: sign_message(c, [K["b1"]]), SignatureError),
    ("seq_changed_after_signing", lambda c: sign_message(c, [K["c1"]]).model_copy(update={"seq": 6}), SignatureError),
    ("url_changed_after_signing", lambda c: sign_message(c, [K["c1"]]).model_copy(
        update={"bundle": c.bundle.model_copy(update={"url": "http://evil/api/v1/bundles/x"})}), SignatureError),
    ("root_version_changed", lambda c: sign_message(c, [K["c1"]]).model_copy(update={"root_version": 9}),
     SignatureError),
]


@pytest.mark.parametrize(("make", "error"), [pytest.param(m, e, id=i) for i, m, e in COMMANDS])
def test_forged_command_refused(v1, make, error) -> None:
    with pytest.raises(error):
        verify_message(make(_deploy()), v1.keyring("commands"))


def test_signed_command_survives_the_wire(v1) -> None:
    from protocol.messages import encode, parse_message

    for cmd in (_deploy(root_version=3), CancelCommand(deployment_id="d1", device_id="dev-1", sent_at=NOW, seq=7)):
        wire = parse_message(encode(sign_message(cmd, [K["c1"]])))
        verify_message(wire, v1.keyring("commands"))
        assert wire.signatures and wire == sign_message(cmd, [K["c1"]])


def test_root_version_is_bounded() -> None:
    from protocol.errors import MessageError
    from protocol.messages import encode, parse_message

    doc = json.loads(encode(_deploy()))
    for bad in (0, 2**63, True, "2"):
        with pytest.raises(MessageError):
            parse_message(json.dumps({**doc, "root_version": bad}).encode())


def test_parse_root_reads_without_trusting() -> None:
    data = sign(signed(1), "x")  # not signed by its own root role
    assert parse_root(data).version == 1
    with pytest.raises(SlmopsError):
        load_trusted_root(data)


def test_keyring_threshold_follows_the_role() -> None:
    root = load_trusted_root(sign(signed(1, bundles=("b1", "b2", "b3"), bundles_t=3), "r1"))
    assert root.keyring("bundles") == Keyring(tuple(root.keys[k] for k in root.roles["bundles"].keyids), 3)
