"""Enrolment and revocation reach mosquitto live, through its dynamic-security plugin.

Workflow: `DynsecAccounts(opts)` (or `.from_settings(settings)`, with `broker_admin_username`/`_password`) connects
one paho client as the broker's dynamic-security admin and subscribes to `$CONTROL/dynamic-security/v1/response`.
`add_device(device_id, password)` sends, in one request, the commands that (re)create the device's own role
`slmops-device-<id>` (publish its status, telemetry and presence; subscribe to and receive its cmd topic) and its
client: user name = the device id, client id fixed to `slmops-agent-<id>` (so nobody else can use it, and the device
cannot use another), password, that one role. `remove_device(device_id)` deletes the client (mosquitto disconnects
a live session of a deleted client at once) and its role. Each request carries correlation data; the call waits
for mosquitto's answer and raises `BrokerAccountsError` on any error but "not found" while deleting.

Why one role per device: mosquitto 2.0's dynamic security does not substitute %u or %c in ACL topics (checked with
2.0.11: a role allowing `slmops/v1/devices/%u/cmd` refuses the device's own subscription), so each device's topics
are written out. The `fleet` role and the admin are set up once by `deploy/mosquitto/dynsec-init.sh`.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from typing import Any

from mqttlink import ClientOptions, Watch, connect, make_client
from protocol import topics
from protocol.errors import one_line

from .errors import BrokerAccountsError
from .settings import Settings

log = logging.getLogger(__name__)

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = f"{CONTROL}/response"
ANSWER_TIMEOUT_S = 10.0  # seconds to wait for mosquitto to answer one request
NOT_FOUND = ("not found",)  # mosquitto's error text when deleting something that is not there


def device_role(device_id: str) -> str:
    return f"slmops-device-{topics.check_device_id(device_id)}"


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """The device's own topics, nothing else (the same rules as `fleet.acl` for a device)."""
    own = [str(topics.Topic(device_id, ch)) for ch in (topics.Channel.STATUS, topics.Channel.TELEMETRY, topics.Channel.PRESENCE)]
    cmd = str(topics.cmd(device_id))
    return [{"acltype": "publishClientSend", "topic": t, "allow": True} for t in own] + [
        {"acltype": "subscribeLiteral", "topic": cmd, "allow": True},
        {"acltype": "publishClientReceive", "topic": cmd, "allow": True},
    ]


def add_device_commands(device_id: str, password: str) -> list[dict[str, Any]]:
    role, user = device_role(device_id), topics.check_device_id(device_id)
    return [
        {"command": "deleteClient", "username": user},
        {"command": "deleteRole", "rolename": role},
        {"command": "createRole", "rolename": role, "acls": device_acls(device_id)},
        {"command": "createClient", "username": user, "password": password, "clientid": f"slmops-agent-{user}",
         "roles": [{"rolename": role}]},
    ]


def remove_device_commands(device_id: str) -> list[dict[str, Any]]:
    return [
        {"command": "deleteClient", "username": topics.check_device_id(device_id)},
        {"command": "deleteRole", "rolename": device_role(device_id)},
    ]


class DynsecAccounts:
    """`fleet.acl.BrokerAccounts` for mosquitto with the dynamic-security plugin."""

    def __init__(self, opts: ClientOptions, *, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        self.opts, self.timeout_s = opts, timeout_s
        self._lock = threading.Condition()
        self._answers: dict[str, dict[str, Any]] = {}  # answers to our own pending requests only (bounded)
        self._pending: set[str] = set()
        self._ready = threading.Event()
        self._sub_mid: int | None = None
        self._watch = Watch(log, opts)
        self.client = make_client(opts)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *_a: self._ready.clear()
        self.client.on_message = self._on_message
        connect(self.client, opts)

    @classmethod
    def from_settings(cls, settings: Settings) -> "DynsecAccounts":
        return cls(ClientOptions(
            broker_url=settings.effective_broker_url,
            client_id=f"{settings.client_id}-dynsec",
            username=settings.broker_admin_username,
            password=settings.broker_admin_password,
            ca_file=settings.broker_ca_file,
            cert_file=settings.broker_cert_file,
            key_file=settings.broker_key_file,
            reconnect_max_s=settings.reconnect_max_s,
        ))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # ---- BrokerAccounts -----------------------------------------------------------------------------------------

    def add_device(self, device_id: str, password: str) -> None:
        self.run(add_device_commands(device_id, password), may_be_missing={"deleteClient", "deleteRole"})
        log.info("mosquitto: device %s enrolled", device_id)

    def remove_device(self, device_id: str) -> None:
        self.run(remove_device_commands(device_id), may_be_missing={"deleteClient", "deleteRole"})
        log.info("mosquitto: device %s removed (and disconnected if it was online)", device_id)

    # ---- the control topic --------------------------------------------------------------------------------------

    def run(self, commands: list[dict[str, Any]], *, may_be_missing: set[str] = frozenset()) -> list[dict[str, Any]]:  # type: ignore[assignment]
        """Send the commands in one request and return mosquitto's answers, in order; raise on any error."""
        if not self._ready.wait(self.timeout_s):
            raise BrokerAccountsError(
                f"cannot reach mosquitto's dynamic security at {self.opts.address} as {self.opts.username!r} within "
                f"{self.timeout_s:g}s: check the broker and the admin credentials (broker_admin_username/password)"
            )
        ids = [secrets.token_hex(8) for _ in commands]
        payload = {"commands": [{**c, "correlationData": i} for c, i in zip(commands, ids, strict=True)]}
        with self._lock:
            self._pending.update(ids)
        try:
            self.client.publish(CONTROL, json.dumps(payload), qos=1)
            with self._lock:
                if not self._lock.wait_for(lambda: all(i in self._answers for i in ids), self.timeout_s):
                    raise BrokerAccountsError(f"mosquitto did not answer {commands[0]['command']} within {self.timeout_s:g}s")
                answers = [self._answers[i] for i in ids]
        finally:
            with self._lock:
                self._pending.difference_update(ids)
                for i in ids:
                    self._answers.pop(i, None)
        for c, a in zip(commands, answers, strict=True):
            error = a.get("error")
            if error and not (c["command"] in may_be_missing and any(n in str(error).lower() for n in NOT_FOUND)):
                raise BrokerAccountsError(f"mosquitto refused {c['command']}: {str(error)[:200]}")
        return answers

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if self._watch.connack_ok(reason):
            _, self._sub_mid = client.subscribe(RESPONSE, qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any = None) -> None:
        if mid == self._sub_mid and self._watch.suback_ok([RESPONSE], reasons):
            self._ready.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        # an exception here would stop paho's network loop: anything unreadable is dropped with one log line
        try:
            doc = json.loads(msg.payload)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, int digit limit, nested too deep
            log.warning("dropped an unreadable dynamic-security response: %s", one_line(exc))
            return
        responses = doc.get("responses", []) if isinstance(doc, dict) else None
        if not isinstance(responses, list):
            log.warning("dropped a dynamic-security response without a list of responses")
            return
        with self._lock:
            for r in responses:
                if isinstance(r, dict) and isinstance(r.get("correlationData"), str) and r["correlationData"] in self._pending:
                    self._answers[r["correlationData"]] = r
            self._lock.notify_all()
