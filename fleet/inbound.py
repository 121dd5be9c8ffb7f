"""How checked inbound device messages are written: one batch in one transaction (`store_batch`), or one message.

Workflow: the ingest writer (fleet/ingest.py) hands `store_batch` a batch of `Item`s (a message and the time the
fleet received it), in the order paho received them, inside its open transaction; the caller commits.
`store_batch` writes the whole batch with a handful of statements whatever its size:

1. every device the batch names is registered: one SELECT of the known ids, an upsert per device never seen before
   (`crud._insert_device`, so an API registration at the same moment does not fail);
2. telemetry: one multi-row INSERT ... ON CONFLICT (message_id) DO NOTHING ... RETURNING message_id (SQLite and
   PostgreSQL; SQLAlchemy's "insertmanyvalues" sends pages of rows), so a sample already stored (a QoS 1 redelivery,
   an outbox re-send, another replica) is skipped and counted, never an error;
3. status reports and presence, in arrival order, through the same rules as one message at a time
   (`crud.apply_status`, `crud.apply_presence`): one SELECT finds the reports already stored, one SELECT loads the
   deployment targets they name, so a report older (by `seq`) than the one that set its target's state still lands
   in the history but does not move the target, whatever batch each came in; the history rows are inserted together;
4. each device's `last_seen` is set once, to the time of its newest message in the batch (one executemany UPDATE);
5. a presence "online" from a device whose newest deployment is unfinished queues its deploy command again in the
   outbox (`fleet.deployments.commands_to_resend`, fleet/outbox.py), and a device that came online into a rollout's
   target it was not part of joins it (`fleet.rollouts.adopt_device`), in the same transaction; the commands are
   returned too, for counting (the outbox publisher sends them after the commit).

`store_message` is the same for one message with the per-message crud functions (kept for the benchmark's old path
and for callers outside the writer). Both count: `stored` new rows, `duplicates` skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session, selectinload

from protocol.messages import DeployCommand, Presence, StatusReport, Telemetry

from . import crud, outbox
from .deployments import commands_to_resend_many
from .rollouts import adopt_devices
from .models import DeploymentTarget, Device, StatusReportRow, TelemetrySample
from .settings import Settings

log = logging.getLogger(__name__)

Inbound = StatusReport | Telemetry | Presence
IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Item:
    """One checked message and the time the fleet received it (the `received_at` it is stored with)."""

    msg: Inbound
    received_at: datetime


@dataclass
class Written:
    """What one transaction wrote: new rows, messages skipped as already stored, deploy commands it queued again."""

    stored: int = 0
    duplicates: int = 0
    commands: list[DeployCommand] = field(default_factory=list)


def store_message(s: Session, item: Item, settings: Settings) -> tuple[Outcome, list[DeployCommand]]:
    """Write one message inside the caller's transaction; returns its outcome and the deploy commands to publish
    once that transaction has committed."""
    msg, now = item.msg, item.received_at
    if isinstance(msg, StatusReport):
        return (Outcome.STORED if crud.record_status(s, msg=msg, now=now) else Outcome.DUPLICATE), []
    if isinstance(msg, Telemetry):
        return (Outcome.STORED if crud.record_telemetry(s, msg=msg, now=now) else Outcome.DUPLICATE), []
    crud.record_presence(s, msg=msg, now=now)
    if msg.online:
        return Outcome.STORED, came_online(s, device_id=msg.device_id, settings=settings, now=now)
    return Outcome.STORED, []


def came_online(s: Session, *, device_id: str, settings: Settings, now: datetime) -> list[DeployCommand]:
    return came_online_many(s, device_ids=[device_id], settings=settings, now=now)


def came_online_many(s: Session, *, device_ids: Sequence[str], settings: Settings, now: datetime) -> list[DeployCommand]:
    """Queue each device's unfinished command again and let each join a rollout it belongs to (a few queries for
    all of them); the commands resent."""
    if not device_ids:
        return []
    s.flush()  # what this batch wrote so far (a report that finished a target) decides what is resent
    resent = commands_to_resend_many(s, settings=settings, device_ids=device_ids, now=now)
    outbox.enqueue_many(s, resent, now=now)
    for device_id, rollout_id in adopt_devices(s, device_ids=device_ids, settings=settings, now=now).items():
        log.info("device %s joins rollout %s", device_id, rollout_id)
    return resent


def store_batch(s: Session, items: Sequence[Item], settings: Settings) -> Written:
    """Write a batch (no two items with the same kind and message_id) inside the caller's transaction."""
    out = Written()
    if not items:
        return out
    seen: dict[str, datetime] = {}
    for item in items:  # each device's newest receipt in this batch becomes its last_seen
        d = item.msg.device_id
        seen[d] = max(seen.get(d, item.received_at), item.received_at)
    _register(s, seen)
    samples = [i for i in items if isinstance(i.msg, Telemetry)]
    if samples:
        n = _insert_samples(s, samples)
        out.stored += n
        out.duplicates += len(samples) - n
    ordered = [i for i in items if not isinstance(i.msg, Telemetry)]
    if ordered:
        _reports_and_presence(s, ordered, settings, out)
    s.execute(
        update(Device.__table__).where(Device.__table__.c.id == bindparam("b_id")).values(last_seen=bindparam("b_seen")),
        [{"b_id": d, "b_seen": t} for d, t in seen.items()],
    )
    return out


def _chunks(values: Sequence[str]) -> list[Sequence[str]]:
    return [values[i : i + IN_CHUNK] for i in range(0, len(values), IN_CHUNK)]


def _register(s: Session, first_seen: dict[str, datetime]) -> None:
    ids = sorted(first_seen)
    known: set[str] = set()
    for chunk in _chunks(ids):
        known.update(s.scalars(select(Device.id).where(Device.id.in_(chunk))))
    for d in ids:
        if d not in known:
            crud._insert_device(s, device_id=d, now=first_seen[d])


def _insert_samples(s: Session, samples: list[Item]) -> int:
    """Insert the samples not stored yet; how many were new."""
    rows = [crud.telemetry_values(i.msg, now=i.received_at) for i in samples]  # type: ignore[arg-type]
    insert = crud._UPSERT.get(s.get_bind().dialect.name)
    if insert is None:  # another database: the per-message path (a check, then the unique constraint)
        return sum(crud.record_telemetry(s, msg=i.msg, now=i.received_at) for i in samples)  # type: ignore[arg-type]
    table = TelemetrySample.__table__
    stmt = insert(table).on_conflict_do_nothing(index_elements=["message_id"])
    if s.get_bind().dialect.name == "sqlite":  # sqlite3's own executemany; its rowcount is the rows inserted
        return s.execute(stmt, rows).rowcount
    return len(s.execute(stmt.returning(table.c.message_id), rows).all())  # pages of multi-row VALUES


def _reports_and_presence(s: Session, items: list[Item], settings: Settings, out: Written) -> None:
    reports = [i.msg for i in items if isinstance(i.msg, StatusReport)]
    stored_before: set[str] = set()
    for chunk in _chunks([r.message_id for r in reports]):
        stored_before.update(s.scalars(select(StatusReportRow.message_id).where(StatusReportRow.message_id.in_(chunk))))
    targets: dict[tuple[str, str], DeploymentTarget] = {}
    pairs = {(r.deployment_id, r.device_id) for r in reports if r.message_id not in stored_before}
    for chunk in _chunks(sorted({d for _, d in pairs})):
        q = (select(DeploymentTarget).options(selectinload(DeploymentTarget.deployment))
             .where(DeploymentTarget.device_id.in_(chunk),
                    DeploymentTarget.deployment_id.in_(sorted({dep for dep, _ in pairs}))))
        targets.update({(t.deployment_id, t.device_id): t for t in s.scalars(q)})
    devices: dict[str, Device] = {}
    for chunk in _chunks(sorted({i.msg.device_id for i in items})):
        devices.update({d.id: d for d in s.scalars(select(Device).where(Device.id.in_(chunk)))})
    history: list[dict[str, object]] = []
    online: list[tuple[str, datetime]] = []  # devices whose presence said online, and when
    for item in items:
        msg, now = item.msg, item.received_at
        device = devices[msg.device_id]
        if isinstance(msg, StatusReport):
            if msg.message_id in stored_before:
                out.duplicates += 1
                continue
            history.append(crud.status_values(msg, now=now))
            crud.apply_status(msg=msg, now=now, device=device, target=targets.get((msg.deployment_id, msg.device_id)))
            out.stored += 1
        elif isinstance(msg, Presence):
            crud.apply_presence(device, msg=msg)
            out.stored += 1
            if msg.online:
                online.append((msg.device_id, now))
    s.flush()
    if history:  # one multi-row INSERT, not a unit-of-work object per report
        s.execute(insert(StatusReportRow), history)
    if online:  # after every report of the batch: a device is asked again only for what is still unfinished
        out.commands += came_online_many(s, device_ids=[d for d, _ in online], settings=settings, now=online[-1][1])
