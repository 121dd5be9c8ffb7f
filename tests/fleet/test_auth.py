"""The fleet API behind roles, through the real app (SQLite file, real broker, real signed bundles).

One table row per (route, role): each role is refused what it may not do (401 without a token, 403 with a known
token of another role; the database unchanged afterwards) and allowed what it may. Then tokens that must not work,
the failed-attempt limit, hashes-not-secrets, the audit trail, enrolment, revocation, the broker's authenticator
and the settings the fleet refuses to start with."""

from __future__ import annotations

import hashlib
import logging
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select, update

from fleet.api.app import DEMO_SECRETS_FILE, create_app
from fleet.auth import DbAuthenticator, FailureLimiter, hash_secret
from fleet.models import ApiToken, AuditEntry, Base, Command, Deployment, Device, EnrolmentToken
from fleet.settings import EXAMPLE_SECRETS, Settings
from protocol.errors import ConfigError

from .conftest import ADMIN, ADMIN_TOKEN, BROKER_PASSWORD, secure_settings

ROLES = ("anonymous", "viewer", "operator", "admin", "device_a", "device_b")
READ = {"viewer", "operator", "admin"}
OPERATE = {"operator", "admin"}
ADMIN_ONLY = {"admin"}
EVERYONE = set(ROLES)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


VOLATILE = {("api_tokens", "last_used_at"), ("outbox", "sent_at")}


@dataclass
class World:
    """A fleet with two enrolled-by-token devices, tiny v1 deployed to dev-a only, and one token per role."""

    client: TestClient
    headers: dict[str, dict[str, str]]
    deployment_id: str
    rollout_id: str
    spare_token_id: int
    v3: bytes
    tokens: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table (but a token's last_used_at, which a refused request may touch, and when the
        broker acknowledged a queued command, which the outbox publisher sets in the background)."""
        out = {}
        with self.client.app.state.fleet.db.sessions() as s:
            for table in Base.metadata.sorted_tables:
                cols = [c for c in table.columns if (table.name, c.name) not in VOLATILE]
                out[table.name] = sorted(map(tuple, s.execute(select(*cols)).all()), key=repr)
        return out


def make_token(client: TestClient, name: str, role: str, device_id: str | None = None) -> tuple[int, str]:
    body = {"name": name, "role": role} | ({"device_id": device_id} if device_id else {})
    r = client.post("/api/v1/tokens", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["token"]


@pytest.fixture
def world(client: TestClient, make_bundle) -> World:
    for dev in ("dev-a", "dev-b"):
        assert client.post("/api/v1/devices", json={"id": dev, "groups": ["lab"]}).status_code == 201
    for v in (1, 2):
        assert client.post("/api/v1/bundles", content=make_bundle("tiny", v).read_bytes()).status_code == 201
    dep = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "dev-a"})
    assert dep.status_code == 201, dep.text
    tokens = {
        "viewer": make_token(client, "dash", "viewer")[1],
        "operator": make_token(client, "ci", "operator")[1],
        "device_a": make_token(client, "dev-a-dl", "device", "dev-a")[1],
        "device_b": make_token(client, "dev-b-dl", "device", "dev-b")[1],
        "admin": ADMIN_TOKEN,
    }
    spare, _ = make_token(client, "spare", "viewer")
    headers = {role: bearer(t) for role, t in tokens.items()} | {"anonymous": {"Authorization": ""}}
    assert client.patch("/api/v1/devices/dev-b/tags", json={"tags": {"site": "x"}}).status_code == 200
    assert client.post("/api/v1/bundles", content=make_bundle("other", 1).read_bytes()).status_code == 201
    ro = client.post("/api/v1/rollouts", json={"bundle": {"name": "other", "version": 1}, "target": {"query": "site=x"},
                                               "strategy": {"rollback_on_abort": False}})
    assert ro.status_code == 201, ro.text
    return World(client, headers, dep.json()["id"], ro.json()["id"], spare, make_bundle("tiny", 3).read_bytes(), tokens)


# (id, method, path, request kwargs, roles allowed, statuses an allowed role gets)
ROUTES: list[tuple[str, str, str, dict[str, Any], set[str], set[int]]] = [
    ("healthz", "GET", "/healthz", {}, EVERYONE, {200}),
    # the signed roots are public (devices fetch them without credentials and verify them): open to everyone; this
    # fleet has no trust folder, so everyone gets the same 404, never a 401 (tests/fleet/test_keys_cli.py serves them)
    ("trust root", "GET", "/api/v1/trust/root.json", {}, EVERYONE, {404}),
    ("trust root n", "GET", "/api/v1/trust/root/1.json", {}, EVERYONE, {404}),
    ("metrics", "GET", "/metrics", {}, READ, {200}),
    ("list devices", "GET", "/api/v1/devices", {}, READ, {200}),
    ("show device", "GET", "/api/v1/devices/dev-a", {}, READ, {200}),
    ("register device", "POST", "/api/v1/devices", {"json": {"id": "dev-n", "groups": ["x"]}}, ADMIN_ONLY, {201, 200}),
    ("revoke device", "POST", "/api/v1/devices/dev-b/revoke", {}, ADMIN_ONLY, {200}),
    ("reinstate device", "POST", "/api/v1/devices/dev-b/reinstate", {}, ADMIN_ONLY, {200}),
    ("device telemetry", "GET", "/api/v1/devices/dev-a/telemetry", {}, READ, {200}),
    ("group telemetry", "GET", "/api/v1/groups/lab/telemetry", {}, READ, {200}),
    ("overview", "GET", "/api/v1/overview", {}, READ, {200}),
    ("list bundles", "GET", "/api/v1/bundles", {}, READ, {200}),
    ("show bundle", "GET", "/api/v1/bundles/tiny/1", {}, READ, {200}),
    ("upload bundle", "POST", "/api/v1/bundles", {"content": "V3"}, OPERATE, {201, 200}),
    ("download deployed bundle", "GET", "/api/v1/bundles/tiny/1/file", {}, OPERATE | {"device_a"}, {200}),
    ("head deployed bundle", "HEAD", "/api/v1/bundles/tiny/1/file", {}, OPERATE | {"device_a"}, {200}),
    ("download undeployed bundle", "GET", "/api/v1/bundles/tiny/2/file", {}, OPERATE, {200}),
    ("list deployments", "GET", "/api/v1/deployments", {}, READ, {200}),
    ("show deployment", "GET", "/api/v1/deployments/{deployment}", {}, READ, {200}),
    ("create deployment", "POST", "/api/v1/deployments", {"json": {"bundle": "tiny", "version": 2, "device_id": "dev-b"}}, OPERATE, {201}),
    ("tag device", "PATCH", "/api/v1/devices/dev-a/tags", {"json": {"tags": {"site": "b1"}}}, OPERATE, {200}),
    ("list groups", "GET", "/api/v1/groups", {}, READ, {200}),
    ("list rollouts", "GET", "/api/v1/rollouts", {}, READ, {200}),
    ("show rollout", "GET", "/api/v1/rollouts/{rollout}", {}, READ, {200}),
    ("create rollout", "POST", "/api/v1/rollouts",
     {"json": {"bundle": {"name": "tiny", "version": 1}, "target": {"query": "group=lab"}, "gate": {"no_regression": False}}},
     OPERATE, {201}),
    ("pause rollout", "POST", "/api/v1/rollouts/{rollout}/pause", {}, OPERATE, {200, 409}),
    ("resume rollout", "POST", "/api/v1/rollouts/{rollout}/resume", {}, OPERATE, {200, 409}),
    ("cancel rollout", "POST", "/api/v1/rollouts/{rollout}/cancel", {}, OPERATE, {200, 409}),
    ("create token", "POST", "/api/v1/tokens", {"json": {"name": "new", "role": "viewer"}}, ADMIN_ONLY, {201}),
    ("list tokens", "GET", "/api/v1/tokens", {}, ADMIN_ONLY, {200}),
    ("revoke token", "POST", "/api/v1/tokens/{spare}/revoke", {}, ADMIN_ONLY, {200}),
    ("create enrolment token", "POST", "/api/v1/enrolment-tokens", {"json": {"groups": ["lab"]}}, ADMIN_ONLY, {201}),
    ("list enrolment tokens", "GET", "/api/v1/enrolment-tokens", {}, ADMIN_ONLY, {200}),
    ("audit log", "GET", "/api/v1/audit", {}, ADMIN_ONLY, {200}),
]
OPEN_ROUTES = {("POST", "/api/v1/enrol")}  # carries its own one-time token; tested in the enrolment table below


@pytest.mark.parametrize("case, method, path, kwargs, allowed, ok", ROUTES, ids=[r[0] for r in ROUTES])
def test_each_role_is_refused_what_it_may_not_do(world: World, case, method, path, kwargs, allowed, ok) -> None:
    path = path.format(deployment=world.deployment_id, spare=world.spare_token_id, rollout=world.rollout_id)
    if kwargs.get("content") == "V3":
        kwargs = {"content": world.v3}
    for role in ROLES:  # refusals first, so the database they see is the one the table describes
        if role in allowed:
            continue
        before = world.snapshot()
        r = world.client.request(method, path, headers=world.headers[role], **kwargs)
        if role == "anonymous":
            assert r.status_code == 401, (role, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert method == "HEAD" or r.json()["code"] == "unauthenticated"
        else:
            assert r.status_code == 403, (role, r.text)
            assert method == "HEAD" or r.json()["code"] == "forbidden"
        assert world.snapshot() == before, f"{role} was refused {case} but the database changed"
    for role in sorted(allowed):
        r = world.client.request(method, path, headers=world.headers[role], **kwargs)
        assert r.status_code in ok, (role, r.status_code, r.text[:300])


def test_the_table_covers_every_route(client: TestClient) -> None:
    """A route added without a row here fails: whoever adds it says which roles may use it."""
    rows = {(m, p.replace("{deployment}", "{deployment_id}").replace("{spare}", "{token_id}")
             .replace("{rollout}", "{rollout_id}")) for _, m, p, *_ in ROUTES}
    for path, ops in client.get("/openapi.json").json()["paths"].items():
        for method in ops:
            key = (method.upper(), path)
            concrete = {(m, p) for m, p in rows if m == key[0] and _same_template(p, path)}
            assert concrete or key in OPEN_ROUTES, f"{key} has no row in ROUTES: say which roles may use it"


def _same_template(row_path: str, route_path: str) -> bool:
    a, b = row_path.strip("/").split("/"), route_path.strip("/").split("/")
    return len(a) == len(b) and all(x == y or y.startswith("{") for x, y in zip(a, b))


def test_openapi_documents_the_bearer_scheme(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["bearer"]["description"]
    }  # fmt: skip
    assert schema["paths"]["/api/v1/devices"]["get"]["security"] == [{"bearer": []}]
    assert schema["paths"]["/api/v1/tokens"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert "security" not in schema["paths"]["/api/v1/enrol"]["post"]


def test_metrics_can_be_made_public(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"metrics_public": True}))) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/api/v1/devices").status_code == 401


# ---- tokens that must not work ----------------------------------------------------------------------------------

BAD_TOKENS = [
    ("no header", None),
    ("basic scheme", "Basic YWRtaW46YWRtaW4="),
    ("empty bearer", "Bearer "),
    ("unknown token", "Bearer slm_" + "A" * 43),
    ("admin token with a tail", f"Bearer {ADMIN_TOKEN}x"),
    ("admin token cut short", f"Bearer {ADMIN_TOKEN[:-1]}"),
    ("far too long", "Bearer " + "x" * 10_000),
    ("revoked token", "REVOKED"),
    ("token of a revoked device", "REVOKED_DEVICE"),
]


@pytest.mark.parametrize("case, header", BAD_TOKENS, ids=[r[0] for r in BAD_TOKENS])
def test_bad_absent_and_revoked_tokens_get_401(world: World, case: str, header: str | None) -> None:
    if header == "REVOKED":
        assert world.client.post(f"/api/v1/tokens/{world.spare_token_id}/revoke").status_code == 200
        with world.client.app.state.fleet.db.sessions() as s:
            row = s.get(ApiToken, world.spare_token_id)
            assert row is not None and row.revoked_at is not None
        _, secret = make_token(world.client, "to-revoke", "operator")
        ids = [t["id"] for t in world.client.get("/api/v1/tokens").json() if t["name"] == "to-revoke"]
        assert world.client.post(f"/api/v1/tokens/{ids[0]}/revoke").status_code == 200
        header = f"Bearer {secret}"
    elif header == "REVOKED_DEVICE":
        assert world.client.post("/api/v1/devices/dev-a/revoke").status_code == 200
        header = f"Bearer {world.tokens['device_a']}"
    before = world.snapshot()
    r = world.client.get("/api/v1/bundles/tiny/1/file", headers={"Authorization": header or ""})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["code"] == "unauthenticated"
    assert world.snapshot() == before


# ---- failed attempts ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_failed_attempts_are_rate_limited_and_logged_without_the_token(settings: Settings, caplog) -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=10, window_s=60, clock=clock)
    guesses = [f"slm_guess-{i:02d}-{'q' * 40}" for i in range(10)]
    caplog.set_level(logging.WARNING, logger="slmops.fleet.auth")
    with TestClient(create_app(settings, limiter=limiter)) as c:
        for g in guesses:
            assert c.get("/api/v1/devices", headers=bearer(g)).status_code == 401
            clock.t += 1
        blocked = c.get("/api/v1/devices", headers=ADMIN)  # even the right token waits: the address is blocked
        assert blocked.status_code == 429 and blocked.json()["code"] == "rate_limited"
        assert blocked.headers["retry-after"] == "50"
        enrol = c.post("/api/v1/enrol", json={"token": "slm_x", "device_id": "dev-z"})
        assert enrol.status_code == 429
        clock.t += 50
        assert c.get("/api/v1/devices", headers=ADMIN).status_code == 200
        assert c.get("/healthz").status_code == 200  # open routes never count or block
    refusals = [r.getMessage() for r in caplog.records if "refused credentials" in r.getMessage()]
    assert len(refusals) == 10 and all("\n" not in m for m in refusals)
    text = caplog.text
    assert not any(g in text or g[4:20] in text for g in guesses)
    assert ADMIN_TOKEN not in text


def test_the_limiter_forgets_old_failures_and_bounds_its_memory() -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=2, window_s=10, clock=clock, max_addresses=3)
    limiter.failed("a")
    limiter.failed("a")
    with pytest.raises(Exception, match="too many failed") as info:
        limiter.check("a")
    assert info.value.retry_after_s == 10  # type: ignore[attr-defined]
    clock.t += 10
    limiter.check("a")
    for addr in ("b", "c", "d", "e"):
        limiter.failed(addr)
        limiter.failed(addr)
    assert len(limiter._failures) == 3  # the stalest address was dropped
    limiter.check("b")  # dropped, so no longer blocked
    with pytest.raises(Exception, match="too many failed"):
        limiter.check("e")


# ---- secrets are stored as hashes; changes are audited ----------------------------------------------------------


def database_bytes(settings: Settings) -> bytes:
    return b"".join(p.read_bytes() for p in settings.data_dir.glob("fleet.db*"))


def test_only_hashes_of_tokens_and_broker_secrets_are_stored(world: World, settings: Settings) -> None:
    made = world.client.post("/api/v1/enrolment-tokens", json={"groups": ["lab"], "device_id": "dev-x"}).json()
    identity = world.client.post("/api/v1/enrol", json={"token": made["token"], "device_id": "dev-x"}).json()
    with world.client.app.state.fleet.db.sessions() as s:
        hashes = set(s.scalars(select(ApiToken.token_hash)))
        assert {hash_secret(t) for t in world.tokens.values() if t != ADMIN_TOKEN} <= hashes
        assert hash_secret(identity["api_token"]) in hashes
        device = s.get(Device, "dev-x")
        assert device is not None and device.broker_secret_hash == hashlib.sha256(identity["broker_password"].encode()).hexdigest()
        assert s.scalar(select(EnrolmentToken.token_hash)) == hash_secret(made["token"])
    raw = database_bytes(settings)
    for secret in [*world.tokens.values(), made["token"], identity["api_token"], identity["broker_password"]]:
        assert secret.encode() not in raw
    listed = world.client.get("/api/v1/tokens").text + world.client.get("/api/v1/enrolment-tokens").text
    assert "slm_" not in listed and "hash" not in listed


@pytest.mark.both_databases
def test_every_change_is_audited_with_its_actor(client: TestClient, make_bundle) -> None:
    _, ops = make_token(client, "ops", "operator")
    assert client.post("/api/v1/devices", json={"id": "dev-a", "groups": ["lab"]}).status_code == 201
    assert client.post("/api/v1/bundles", content=make_bundle("tiny", 1).read_bytes(), headers=bearer(ops)).status_code == 201
    dep = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "group": "lab"}, headers=bearer(ops))
    assert dep.status_code == 201
    enrol_token = client.post("/api/v1/enrolment-tokens", json={"groups": ["lab"]}).json()
    assert client.post("/api/v1/enrol", json={"token": enrol_token["token"], "device_id": "dev-b"}).status_code == 201
    assert client.post("/api/v1/devices/dev-b/revoke").status_code == 200
    assert client.post("/api/v1/devices/dev-b/reinstate").status_code == 200
    assert client.post("/api/v1/tokens/1/revoke").status_code == 200
    rows = client.get("/api/v1/audit").json()
    got = [(r["actor"], r["action"], r["target"]) for r in reversed(rows)]
    assert got == [
        ("bootstrap", "token.created", "token:1"),
        ("bootstrap", "device.registered", "device:dev-a"),
        ("ops", "bundle.uploaded", "bundle:tiny:1"),
        ("ops", "deployment.created", f"deployment:{dep.json()['id']}"),
        ("bootstrap", "enrolment_token.created", "enrolment:1"),
        ("device:dev-b", "token.created", "token:2"),
        ("device:dev-b", "device.enrolled", "device:dev-b"),
        ("bootstrap", "device.revoked", "device:dev-b"),
        ("bootstrap", "device.reinstated", "device:dev-b"),
        ("bootstrap", "token.revoked", "token:1"),
    ]
    assert all(datetime.fromisoformat(r["at"]).tzinfo is not None for r in rows)
    assert [r["id"] for r in client.get("/api/v1/audit?limit=2").json()] == [rows[0]["id"], rows[1]["id"]]
    with client.app.state.fleet.db.sessions() as s:
        assert s.query(AuditEntry).count() == len(rows)


# ---- enrolment ----------------------------------------------------------------------------------------------


class Accounts:
    """A BrokerAccounts that records calls (and fails on request), standing in for mosquitto's dynamic security."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def add_device(self, device_id: str, password: str) -> None:
        if self.fail:
            raise RuntimeError("dynsec said no")
        self.calls.append(("add", device_id))

    def remove_device(self, device_id: str) -> None:
        if self.fail:
            raise RuntimeError("dynsec said no")
        self.calls.append(("remove", device_id))


@pytest.fixture
def accounts() -> Accounts:
    return Accounts()


@pytest.fixture
def enrol_client(settings: Settings, accounts: Accounts) -> Iterator[TestClient]:
    with TestClient(create_app(settings, accounts=accounts), headers=ADMIN) as c:
        yield c


def enrolment_token(c: TestClient, **body: Any) -> str:
    r = c.post("/api/v1/enrolment-tokens", json={"groups": ["lab", "north"], **body})
    assert r.status_code == 201, r.text
    return r.json()["token"]


@pytest.mark.both_databases
def test_enrolment_gives_a_device_its_own_credentials(enrol_client: TestClient, settings: Settings, accounts: Accounts, make_bundle) -> None:
    c = enrol_client
    token = enrolment_token(c, device_id="pump-1")
    r = c.post("/api/v1/enrol", json={"token": token, "device_id": "pump-1"}, headers={"Authorization": ""})
    assert r.status_code == 201, r.text
    ident = r.json()
    assert ident["device_id"] == ident["broker_username"] == "pump-1"
    assert ident["broker_url"] == settings.effective_broker_url and ident["fleet_url"] == settings.public_url
    assert ident["api_token"].startswith("slm_") and len(ident["broker_password"]) >= 43
    assert accounts.calls == [("add", "pump-1")]
    device = c.get("/api/v1/devices/pump-1").json()
    assert device["groups"] == ["lab", "north"] and device["enrolled"] is True and device["revoked_at"] is None
    auth = DbAuthenticator(c.app.state.fleet.db.sessions, BROKER_PASSWORD)
    principal = auth.authenticate("pump-1", ident["broker_password"])
    assert principal is not None and principal.device_id == "pump-1"
    # its API token downloads what is deployed to it, and nothing else
    assert c.post("/api/v1/bundles", content=make_bundle("tiny", 1).read_bytes()).status_code == 201
    assert c.post("/api/v1/bundles", content=make_bundle("tiny", 2).read_bytes()).status_code == 201
    dl = bearer(ident["api_token"])
    assert c.get("/api/v1/bundles/tiny/1/file", headers=dl).status_code == 403
    assert c.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "group": "north"}).status_code == 201
    part = c.get("/api/v1/bundles/tiny/1/file", headers={**dl, "Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100
    assert c.get("/api/v1/bundles/tiny/2/file", headers=dl).status_code == 403
    assert c.get("/api/v1/devices", headers=dl).status_code == 403


def _state(c: TestClient) -> tuple[Any, ...]:
    with c.app.state.fleet.db.sessions() as s:
        devices = sorted((d.id, d.broker_secret_hash is not None, d.revoked_at is not None, tuple(d.group_names)) for d in s.scalars(select(Device)))
        used = sorted((t.id, t.used_at is not None, t.used_by_device) for t in s.scalars(select(EnrolmentToken)))
        tokens = sorted((t.name, t.revoked_at is not None) for t in s.scalars(select(ApiToken)))
    return devices, used, tokens


def _expire(c: TestClient) -> None:
    with c.app.state.fleet.db.sessions() as s, s.begin():
        s.execute(update(EnrolmentToken).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))


def _use_once(c: TestClient) -> None:
    token = enrolment_token(c)
    assert c.post("/api/v1/enrol", json={"token": token, "device_id": "first"}).status_code == 201
    c.app.state.reused = token


def _revoked(c: TestClient) -> None:
    assert c.post("/api/v1/devices", json={"id": "pump-1"}).status_code == 201
    assert c.post("/api/v1/devices/pump-1/revoke").status_code == 200


# (id, setup, token to send ("NEW": a fresh one; "REUSED": one already used), device id, status, code)
ENROL_REFUSALS = [
    ("unknown token", None, "slm_" + "B" * 43, "pump-1", 401, "enrolment_refused"),
    ("reused token", _use_once, "REUSED", "pump-1", 401, "enrolment_refused"),
    ("expired token", _expire, "NEW", "pump-1", 401, "enrolment_refused"),
    ("pinned to another id", None, "PINNED", "pump-2", 401, "enrolment_refused"),
    ("revoked device", _revoked, "NEW", "pump-1", 403, "device_revoked"),
    ("device id with a slash", None, "NEW", "a/b", 422, None),
    ("device id with a wildcard", None, "NEW", "pump+", 422, None),
    ("device id with a newline", None, "NEW", "pump-1\n", 422, None),
    ("device id too long", None, "NEW", "d" * 129, 422, None),
    ("device id empty", None, "NEW", "", 422, None),
    ("the fleet's own username", None, "NEW", "fleet", 422, None),
    ("token too long", None, "x" * 5000, "pump-1", 422, None),
]


@pytest.mark.parametrize("case, setup, token, device_id, status, code", ENROL_REFUSALS, ids=[r[0] for r in ENROL_REFUSALS])
def test_enrolment_refusals_leave_the_database_as_it_was(
    enrol_client: TestClient, accounts: Accounts, case, setup, token, device_id, status, code
) -> None:
    c = enrol_client
    if token == "NEW":
        token = enrolment_token(c)
    elif token == "PINNED":
        token = enrolment_token(c, device_id="pump-1")
    if setup is not None:
        setup(c)
    if token == "REUSED":
        token = c.app.state.reused
    calls, before = list(accounts.calls), _state(c)
    r = c.post("/api/v1/enrol", json={"token": token, "device_id": device_id}, headers={"Authorization": ""})
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["code"] == code
    assert _state(c) == before and accounts.calls == calls


def test_a_broker_that_refuses_the_account_undoes_the_enrolment(settings: Settings) -> None:
    with TestClient(create_app(settings, accounts=Accounts(fail=True)), headers=ADMIN) as c:
        token = enrolment_token(c)
        before = _state(c)
        r = c.post("/api/v1/enrol", json={"token": token, "device_id": "pump-1"})
        assert r.status_code == 502 and r.json()["code"] == "broker_accounts"
        assert _state(c) == before  # the token is still unused: the device may try again


@pytest.mark.both_databases
def test_revocation_locks_a_device_out_until_reinstated(enrol_client: TestClient, accounts: Accounts) -> None:
    c = enrol_client
    ident = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "pump-1"}).json()
    auth = DbAuthenticator(c.app.state.fleet.db.sessions, BROKER_PASSWORD)
    assert auth.authenticate("pump-1", ident["broker_password"]) is not None
    r = c.post("/api/v1/devices/pump-1/revoke")
    assert r.status_code == 200 and r.json()["revoked_at"] and r.json()["enrolled"] is False
    assert accounts.calls == [("add", "pump-1"), ("remove", "pump-1")]
    assert auth.authenticate("pump-1", ident["broker_password"]) is None
    assert c.get("/api/v1/bundles", headers=bearer(ident["api_token"])).status_code == 401
    again = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "pump-1"})
    assert again.status_code == 403 and again.json()["code"] == "device_revoked"
    assert c.post("/api/v1/devices/pump-1/reinstate").status_code == 200
    fresh = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "pump-1"})
    assert fresh.status_code == 201
    assert auth.authenticate("pump-1", ident["broker_password"]) is None  # the old secret stays dead
    assert auth.authenticate("pump-1", fresh.json()["broker_password"]) is not None
    assert c.post("/api/v1/devices/nope/revoke").status_code == 404


def test_a_revoked_device_is_left_out_of_deployments(enrol_client: TestClient, make_bundle) -> None:
    c = enrol_client
    for dev in ("pump-1", "pump-2"):
        assert c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": dev}).status_code == 201
    assert c.post("/api/v1/bundles", content=make_bundle("tiny", 1).read_bytes()).status_code == 201
    assert c.post("/api/v1/devices/pump-2/revoke").status_code == 200
    assert c.get("/api/v1/devices/pump-2").json()["online"] is False
    direct = c.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "pump-2"})
    assert direct.status_code == 403 and direct.json()["code"] == "device_revoked"
    with c.app.state.fleet.db.sessions() as s:  # nothing planned, no command recorded
        assert s.scalar(select(func.count()).select_from(Deployment)) == 0
        assert s.scalar(select(func.count()).select_from(Command)) == 0
    group = c.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "group": "lab"})
    assert group.status_code == 201, group.text
    assert [t["device_id"] for t in group.json()["targets"]] == ["pump-1"]


def test_reenrolment_replaces_the_old_credentials(enrol_client: TestClient) -> None:
    c = enrol_client
    old = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "pump-1"}).json()
    new = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "pump-1"}).json()
    auth = DbAuthenticator(c.app.state.fleet.db.sessions, BROKER_PASSWORD)
    assert auth.authenticate("pump-1", old["broker_password"]) is None
    assert c.get("/api/v1/bundles/tiny/1/file", headers=bearer(old["api_token"])).status_code == 401
    assert c.get("/api/v1/bundles/tiny/1/file", headers=bearer(new["api_token"])).status_code == 403  # known, not deployed


# ---- the broker's authenticator -----------------------------------------------------------------------------


@pytest.fixture
def enrolled(enrol_client: TestClient) -> dict[str, str]:
    c = enrol_client
    a = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "dev-a"}).json()
    b = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "dev-b"}).json()
    gone = c.post("/api/v1/enrol", json={"token": enrolment_token(c), "device_id": "dev-gone"}).json()
    assert c.post("/api/v1/devices/dev-gone/revoke").status_code == 200
    assert c.post("/api/v1/devices", json={"id": "dev-plain"}).status_code == 201  # registered, never enrolled
    return {"a": a["broker_password"], "b": b["broker_password"], "gone": gone["broker_password"]}


# (id, username, password (a key of `enrolled`, the fleet's, or literal), expected principal or None)
BROKER_LOGINS = [
    ("fleet with its password", "fleet", "FLEET", ("fleet", None)),
    ("fleet with a wrong password", "fleet", "wrong-password-wrong-password", None),
    ("fleet with a device's password", "fleet", "a", None),
    ("fleet without a password", "fleet", None, None),
    ("device with its secret", "dev-a", "a", ("device", "dev-a")),
    ("device with another's secret", "dev-a", "b", None),
    ("device with the fleet's password", "dev-a", "FLEET", None),
    ("device with an empty password", "dev-a", "", None),
    ("revoked device with its old secret", "dev-gone", "gone", None),
    ("registered, never enrolled", "dev-plain", "", None),
    ("unknown device", "dev-x", "a", None),
    ("anonymous", None, None, None),
    ("username with a wildcard", "dev-#", "a", None),
    ("username with a slash", "dev-a/x", "a", None),
    ("far too long password", "dev-a", "p" * 10_000, None),
]


@pytest.mark.parametrize("case, username, password, expected", BROKER_LOGINS, ids=[r[0] for r in BROKER_LOGINS])
def test_db_authenticator(enrol_client: TestClient, enrolled: dict[str, str], case, username, password, expected) -> None:
    auth = DbAuthenticator(enrol_client.app.state.fleet.db.sessions, BROKER_PASSWORD)
    secret = BROKER_PASSWORD if password == "FLEET" else enrolled.get(password, password) if password is not None else None
    got = auth.authenticate(username, secret)
    assert (None if got is None else (got.role, got.device_id)) == expected


def test_a_fleet_without_a_broker_password_admits_no_fleet_login(enrol_client: TestClient) -> None:
    assert DbAuthenticator(enrol_client.app.state.fleet.db.sessions, "").authenticate("fleet", "") is None


# ---- values that cannot be stored -----------------------------------------------------------------------------

HUGE = 1 << 63
UNSTORABLE = [
    ("token id beyond 63 bits", "POST", f"/api/v1/tokens/{HUGE}/revoke", None),
    ("token id zero", "POST", "/api/v1/tokens/0/revoke", None),
    ("token name too long", "POST", "/api/v1/tokens", {"name": "n" * 65, "role": "viewer"}),
    ("token name with a newline", "POST", "/api/v1/tokens", {"name": "ci\n", "role": "viewer"}),
    ("token name reserved", "POST", "/api/v1/tokens", {"name": "bootstrap", "role": "viewer"}),
    ("unknown role", "POST", "/api/v1/tokens", {"name": "x", "role": "root"}),
    ("device role without a device", "POST", "/api/v1/tokens", {"name": "x", "role": "device"}),
    ("viewer role with a device", "POST", "/api/v1/tokens", {"name": "x", "role": "viewer", "device_id": "dev-a"}),
    ("enrolment ttl beyond 63 bits", "POST", "/api/v1/enrolment-tokens", {"ttl_s": HUGE}),
    ("enrolment ttl zero", "POST", "/api/v1/enrolment-tokens", {"ttl_s": 0}),
    ("enrolment group too long", "POST", "/api/v1/enrolment-tokens", {"groups": ["g" * 65]}),
    ("enrolment pinned id with a slash", "POST", "/api/v1/enrolment-tokens", {"device_id": "a/b"}),
    ("audit limit beyond 63 bits", "GET", f"/api/v1/audit?limit={HUGE}", None),
    ("audit limit zero", "GET", "/api/v1/audit?limit=0", None),
]


@pytest.mark.parametrize("case, method, path, body", UNSTORABLE, ids=[r[0] for r in UNSTORABLE])
def test_values_that_cannot_be_stored_get_422(world: World, case, method, path, body) -> None:
    before = world.snapshot()
    r = world.client.request(method, path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    assert world.snapshot() == before


# ---- settings the fleet refuses to start with -----------------------------------------------------------------

ADMIN_OK, BROKER_OK = ADMIN_TOKEN, BROKER_PASSWORD
REFUSE_START = [
    ("no trusted key", {"trusted_keys": []}, "no trusted bundle key"),
    ("empty admin token", {"admin_token": ""}, "admin_token is empty"),
    ("admin token 'admin'", {"admin_token": "admin"}, "admin_token is a known default"),
    ("admin token 'changeme'", {"admin_token": "ChangeMe"}, "admin_token is a known default"),
    ("admin token from the docs", {"admin_token": EXAMPLE_SECRETS[0]}, "admin_token is a known default"),
    ("admin token too short", {"admin_token": "slm_abcdefghijklmnop"}, "admin_token is too short"),
    ("admin token too uniform", {"admin_token": "a" * 40}, "too uniform"),
    ("empty broker password", {"broker_password": ""}, "broker_password is empty"),
    ("broker password 'password'", {"broker_password": "password"}, "broker_password is a known default"),
    ("broker password 'secret'", {"broker_password": "secret"}, "broker_password is a known default"),
    ("broker password from the docs", {"broker_password": EXAMPLE_SECRETS[1]}, "broker_password is a known default"),
]


@pytest.mark.parametrize("case, change, message", REFUSE_START, ids=[r[0] for r in REFUSE_START])
def test_the_fleet_refuses_to_start_with_unsafe_settings(tmp_path: Path, case, change, message) -> None:
    good = secure_settings(tmp_path / "fleet")
    values = {k: SecretStr(v) if k in ("admin_token", "broker_password") else v for k, v in change.items()}
    with pytest.raises(ConfigError, match=message):
        create_app(good.model_copy(update=values))
    assert not (tmp_path / "fleet").exists()  # nothing was created


def test_settings_that_may_start(tmp_path: Path) -> None:
    """The same checks pass with a trusted key file, or with a trust folder instead: the app is built."""
    for settings in (secure_settings(tmp_path / "a"),
                     secure_settings(tmp_path / "b").model_copy(update={"trusted_keys": [], "trust_dir": tmp_path / "trust"})):
        app = create_app(settings)
        assert "/api/v1/enrol" in app.openapi()["paths"]


def test_demo_mode_generates_secrets_and_writes_them_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker) -> None:
    monkeypatch.delenv("SLMOPS_FLEET_ADMIN_TOKEN", raising=False)
    settings = Settings(data_dir=tmp_path / "fleet", broker_url=broker.url, demo=True)
    other = Settings(data_dir=tmp_path / "other", demo=True)
    token = settings.admin_token.get_secret_value()
    assert token.startswith("slm_") and len(token) >= 40 and token != other.admin_token.get_secret_value()
    assert token not in repr(settings) and settings.broker_password.get_secret_value() not in repr(settings)
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/v1/devices", headers=bearer(token)).status_code == 200
        assert c.get("/api/v1/devices").status_code == 401  # demo mode still asks for the token
    path = tmp_path / "fleet" / DEMO_SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token in path.read_text() and settings.broker_password.get_secret_value() in path.read_text()


def test_admin_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLMOPS_FLEET_ADMIN_TOKEN", ADMIN_OK)
    monkeypatch.setenv("SLMOPS_FLEET_BROKER_PASSWORD", BROKER_OK)
    s = Settings(data_dir=tmp_path)
    assert s.admin_token.get_secret_value() == ADMIN_OK and s.broker_password.get_secret_value() == BROKER_OK
