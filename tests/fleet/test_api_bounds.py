"""Values from outside that the fleet cannot store get a 422 with a reason, never a 500, and change nothing:
one row per hostile value (python-tuf style: the error AND the state afterwards)."""

from __future__ import annotations

import pytest

HUGE = 1 << 70
ROWS = [
    ("version beyond 63 bits", "/api/v1/deployments", {"bundle": "tiny", "version": HUGE, "device_id": "d-1"}),
    ("version zero", "/api/v1/deployments", {"bundle": "tiny", "version": 0, "device_id": "d-1"}),
    ("version as text", "/api/v1/deployments", {"bundle": "tiny", "version": "2", "device_id": "d-1"}),
    ("bundle name with a newline", "/api/v1/deployments", {"bundle": "tiny\n", "version": 1, "device_id": "d-1"}),
    ("bundle name too long", "/api/v1/deployments", {"bundle": "a" * 65, "version": 1, "device_id": "d-1"}),
    ("device id with a slash", "/api/v1/deployments", {"bundle": "tiny", "version": 1, "device_id": "a/b"}),
    ("device id too long", "/api/v1/deployments", {"bundle": "tiny", "version": 1, "device_id": "d" * 129}),
    ("group with a newline", "/api/v1/deployments", {"bundle": "tiny", "version": 1, "group": "lab\n"}),
    ("group with a wildcard", "/api/v1/deployments", {"bundle": "tiny", "version": 1, "group": "lab/#"}),
    ("device id with a newline", "/api/v1/devices", {"id": "pump-1\n", "groups": []}),
    ("group too long", "/api/v1/devices", {"id": "pump-1", "groups": ["g" * 65]}),
    ("too many groups", "/api/v1/devices", {"id": "pump-1", "groups": [f"g{i}" for i in range(257)]}),
]


@pytest.mark.parametrize("case, route, body", ROWS, ids=[r[0] for r in ROWS])
def test_values_that_cannot_be_stored_get_a_422_and_change_nothing(client, case, route, body):
    before = (client.get("/api/v1/devices").json(), client.get("/api/v1/deployments").json())
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    assert (client.get("/api/v1/devices").json(), client.get("/api/v1/deployments").json()) == before


@pytest.mark.both_databases
@pytest.mark.parametrize("path", [f"/api/v1/deployments?limit={HUGE}", f"/api/v1/devices/d-1?history={HUGE}",
                                  f"/api/v1/bundles/tiny/{HUGE}", "/api/v1/deployments/" + "x" * 5000])
def test_huge_numbers_and_long_ids_in_urls_are_not_server_errors(client, path):
    assert client.get(path).status_code < 500
