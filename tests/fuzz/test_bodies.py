"""Fuzzing the HTTP bodies the fleet accepts and the answers and files the agent reads about its identity.

Parsers (`PARSERS`, run long by `bench/fuzz.py`) and what may come out of them:
    fleet_device, fleet_deployment, fleet_token, fleet_enrolment_token, fleet_enrol
                    a request body the way FastAPI takes it: starlette's `json.loads(body)` (JSONDecodeError is a
                    422, any other exception a 400, so only ValueError and RecursionError are allowed), then
                    `Model.model_validate(doc, from_attributes=True)`; and `Model.model_validate_json(body)`.
                    ValidationError (422) or SlmopsError (the app's handler) only. An accepted body validates
                    to the same object again.
    fleet_upload    the bundle upload body, checked as the route does: `verify_bundle(file, keyring)` with the
                    fleet's keyring and without one, then `signer_keyids`. SlmopsError only.
    dynsec_reply    `DynsecAccounts._on_message`: mosquitto's dynamic-security answer on the fleet's MQTT client
                    (an exception there would stop paho's network loop). Nothing may come out; only answers to
                    pending requests are kept.
    enrol_answer    `agent.enrol.Identity.parse` and `enrol()` against an httpx MockTransport answering the
                    fuzzed body with 201 and with 400. ConfigError only.
    identity_file   `agent.enrol.load_identity` on a fuzzed state/identity.json (0600, sometimes 0644).
                    ConfigError only.

Inputs come from `tests.fuzz.test_parsers`' machinery: valid documents built from the project's own patterns,
mutated (values replaced by hostile ones, keys deleted or added, raw JSON past Python's limits), byte-edited.
"""

from __future__ import annotations

import atexit
from dataclasses import asdict
import json
import logging
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import httpx
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from agent.enrol import MAX_IDENTITY_BYTES, SECRET_RE, URL_RE, Identity, enrol, identity_path, load_identity
from fleet.api.schemas import (
    GROUP_RE, DeploymentCreate, DeviceCreate, EnrolmentTokenCreate, EnrolRequest, TokenCreate,
)
from fleet.auth import MAX_ENROL_TTL, NAME_RE as TOKEN_NAME_RE, ROLES, TOKEN_RE
from fleet.bundles import signer_keyids, read_bundle_envelope, verify_bundle
from fleet.dynsec import DynsecAccounts
from protocol.errors import ConfigError, SlmopsError
from protocol.topics import DEVICE_ID_RE
from tests.fuzz.test_parsers import (
    CI, NOW, RING, bundle_names, bundles, dumps, json_values, mutated, versions, wire,
)

# ---- shared seams -----------------------------------------------------------------------------------------------

_SCRATCH: list[Path] = []


def scratch(name: str) -> Path:
    """A folder reused by every input of one parser in this process (removed at exit): no temp dir per input."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="slmops-fuzz-")))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    path = _SCRATCH[0] / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Loggers switched off for one input (a refusal logs a line; 100,000 of them would drown the run)."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


# ---- fleet request bodies ---------------------------------------------------------------------------------------

device_ids = st.from_regex(DEVICE_ID_RE, fullmatch=True)
groups = st.lists(st.from_regex(GROUP_RE, fullmatch=True), max_size=4)
BODIES: dict[str, tuple[type[BaseModel], st.SearchStrategy]] = {
    "fleet_device": (DeviceCreate, st.fixed_dictionaries({"id": device_ids}, optional={"groups": groups})),
    "fleet_deployment": (DeploymentCreate, st.fixed_dictionaries({"bundle": bundle_names, "version": versions}).flatmap(
        lambda d: st.one_of(st.builds(lambda v: {**d, "device_id": v}, device_ids),
                            st.builds(lambda v: {**d, "group": v}, st.from_regex(GROUP_RE, fullmatch=True))))),
    "fleet_token": (TokenCreate, st.fixed_dictionaries(
        {"name": st.from_regex(TOKEN_NAME_RE, fullmatch=True), "role": st.sampled_from(ROLES)}).flatmap(
        lambda d: st.builds(lambda v: {**d, "device_id": v}, device_ids) if d["role"] == "device" else st.just(d))),
    "fleet_enrolment_token": (EnrolmentTokenCreate, st.fixed_dictionaries({}, optional={
        "groups": groups, "device_id": device_ids.filter(lambda v: v != "fleet"),
        "ttl_s": st.integers(1, int(MAX_ENROL_TTL.total_seconds()))})),
    "fleet_enrol": (EnrolRequest, st.fixed_dictionaries({"token": st.from_regex(TOKEN_RE, fullmatch=True),
                                                         "device_id": device_ids.filter(lambda v: v != "fleet")})),
}
BODY_FIELDS = ("id", "groups", "bundle", "version", "device_id", "group", "name", "role", "ttl_s", "token")


def check_body(model: type[BaseModel]) -> Callable[[bytes], list[BaseModel]]:
    def check(body: bytes) -> list[BaseModel]:
        """Parse `body` both ways FastAPI may; only ValidationError or typed errors may come out. Returns what was
        accepted (each checked to validate again)."""
        accepted = []
        try:
            accepted.append(model.model_validate_json(body))
        except (ValidationError, SlmopsError):
            pass
        try:
            doc = json.loads(body)  # starlette's Request.json(): a JSONDecodeError is FastAPI's 422
        except (ValueError, RecursionError):  # JSONDecodeError, not UTF-8, digit limit, deep nesting: 422 or 400
            doc = None
        else:
            try:
                accepted.append(model.model_validate(doc, from_attributes=True))
            except (ValidationError, SlmopsError):
                pass
        for got in accepted:
            assert model.model_validate(got.model_dump()) == got, "an accepted body does not validate again"
        return accepted

    return check


# ---- the bundle upload ------------------------------------------------------------------------------------------


def check_upload(data: bytes) -> None:
    path = scratch("upload") / "incoming.bundle"
    path.write_bytes(data)
    for ring in (RING, None):
        try:
            manifest = verify_bundle(path, ring, now=NOW)
        except SlmopsError:
            continue
        keyids = signer_keyids(read_bundle_envelope(path))
        assert keyids and all(len(k) == 64 for k in keyids), f"accepted {manifest.name} with signers {keyids}"


# ---- mosquitto's dynamic-security answers -------------------------------------------------------------------------

PENDING = ("a1b2c3d4e5f60718", "0000000000000000")
reply_docs = st.fixed_dictionaries({"responses": st.lists(st.fixed_dictionaries(
    {"command": st.sampled_from(["createClient", "deleteClient", "createRole"]),
     "correlationData": st.sampled_from(PENDING) | st.text(max_size=16)},
    optional={"error": st.text(max_size=30) | st.just("Client not found")}), max_size=4)})


def check_dynsec_reply(payload: bytes) -> None:
    accounts = DynsecAccounts.__new__(DynsecAccounts)  # no broker: only the message handler runs
    accounts._lock, accounts._pending, accounts._answers = threading.Condition(), set(PENDING), {}
    with quiet("fleet.dynsec"):
        accounts._on_message(None, None, SimpleNamespace(payload=payload))
    assert set(accounts._answers) <= set(PENDING), f"kept answers to requests never sent: {list(accounts._answers)[:3]}"
    assert all(isinstance(a, dict) for a in accounts._answers.values())


# ---- the agent's identity: the fleet's enrolment answer and the file it is kept in ---------------------------------

secrets_ = st.from_regex(SECRET_RE, fullmatch=True)
urls = st.from_regex(URL_RE, fullmatch=True) | st.sampled_from(["http://127.0.0.1:8700", "mqtts://fleet.example:8883"])
identity_docs = device_ids.flatmap(lambda d: st.fixed_dictionaries({
    "device_id": st.just(d), "broker_username": st.just(d) | device_ids, "broker_password": secrets_,
    "api_token": secrets_, "broker_url": urls, "fleet_url": urls}))
IDENTITY_FIELDS = ("device_id", "broker_username", "broker_password", "api_token", "broker_url", "fleet_url", "detail")
answers = (wire(identity_docs, IDENTITY_FIELDS) | wire(st.fixed_dictionaries({"detail": json_values}), ("detail",))
           | st.sampled_from([b"[" * 6000, b'{"detail":' + b"[" * 900 + b"]" * 900 + b"}", b"1" * 5000]))

_ANSWER: dict[str, Any] = {}
_HTTP = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(_ANSWER["status"], content=_ANSWER["body"])))


def check_enrol_answer(body: bytes) -> None:
    try:
        identity = Identity.parse(body)
    except ConfigError:
        identity = None
    else:
        assert len(body) <= MAX_IDENTITY_BYTES and Identity.parse(json.dumps(asdict(identity)).encode()) == identity
    for status in (201, 400):
        _ANSWER.update(status=status, body=body)
        try:
            got = enrol("http://fleet.test", "slm_" + "x" * 43, identity.device_id if identity else "pump-1", client=_HTTP)
        except ConfigError:
            continue
        assert status == 201 and got == identity, f"enrol() accepted an answer with HTTP {status}"


def check_identity_file(x: tuple[bytes, bool]) -> None:
    data, private = x
    data_dir = scratch("identity")
    path = identity_path(data_dir)
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        got = load_identity(data_dir)
    except ConfigError:
        return
    assert private and got is not None, "a file others may read was accepted"


PARSERS: dict[str, tuple[st.SearchStrategy, Callable[[Any], None]]] = {
    **{name: (wire(docs, BODY_FIELDS) | mutated(docs, BODY_FIELDS).map(dumps), check_body(model))
       for name, (model, docs) in BODIES.items()},
    "fleet_upload": (bundles, check_upload),
    "dynsec_reply": (wire(reply_docs, ("responses", "correlationData", "error", "command")), check_dynsec_reply),
    "enrol_answer": (answers, check_enrol_answer),
    "identity_file": (st.tuples(answers, st.integers(0, 9).map(bool)), check_identity_file),
}

# ---- the short run (make test) ------------------------------------------------------------------------------------


@CI
@given(st.sampled_from(sorted(BODIES)).flatmap(lambda n: st.tuples(st.just(n), BODIES[n][1])))
def test_valid_fleet_bodies_are_accepted(x: tuple[str, dict]) -> None:
    name, doc = x
    model = BODIES[name][0]
    assert model.model_validate_json(dumps(doc)) == model.model_validate(json.loads(dumps(doc)))


@CI
@given(st.sampled_from(sorted(BODIES)).flatmap(lambda n: st.tuples(st.just(n), PARSERS[n][0])))
def test_fleet_bodies_raise_only_validation_or_typed_errors(x: tuple[str, bytes]) -> None:
    name, body = x
    accepted = PARSERS[name][1](body)  # raises on anything but a ValidationError or a typed error
    assert all(isinstance(got, BODIES[name][0]) for got in accepted)


@CI
@given(PARSERS["fleet_upload"][0])
def test_bundle_upload_raises_only_slmops_errors(data: bytes) -> None:
    check_upload(data)


@CI
@given(PARSERS["dynsec_reply"][0])
@example(b'{"responses": null}')  # found by bench.fuzz: TypeError, iterating None (paho's loop would stop)
@example(b'{"responses": [{"command": "createClient", "correlationData": {"": true}}]}')  # found: unhashable dict
@example(b"[" * 5000)  # RecursionError from json.loads
def test_dynsec_reply_never_raises(payload: bytes) -> None:
    check_dynsec_reply(payload)


@CI
@given(identity_docs)
def test_valid_enrol_answers_parse(doc: dict) -> None:
    _ANSWER.update(status=201, body=dumps(doc))
    assert enrol("http://fleet.test", "slm_" + "x" * 43, doc["device_id"], client=_HTTP) == Identity(**doc)


@CI
@given(PARSERS["enrol_answer"][0])
@example(b"[" * 6000)  # found by bench.fuzz: RecursionError from json.loads in Identity.parse and in enrol()'s 400 path
def test_enrol_answer_raises_only_config_error(body: bytes) -> None:
    check_enrol_answer(body)


@CI
@given(PARSERS["identity_file"][0])
@example((b"[" * 6000, True))  # found by bench.fuzz: RecursionError from json.loads in Identity.parse
def test_identity_file_raises_only_config_error(x: tuple[bytes, bool]) -> None:
    check_identity_file(x)
