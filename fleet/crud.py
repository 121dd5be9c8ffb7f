"""Reads and writes of fleet state, as keyword-only functions over an open `Session`.

Callers own the transaction (`with factory() as s, s.begin(): ...`) and pass the clock in (`now=`), so a function
here never commits and never reads the time. Inbound device messages land through `record_status`,
`record_presence` and `record_telemetry`; each registers a device it has not heard of.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import Select, delete, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from protocol.manifest import Manifest
from protocol.messages import Presence, StatusReport, Telemetry

from .models import (
    AGENT_VERSION_CHARS,
    PENDING,
    Bundle,
    Command,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceGroup,
    DeviceTag,
    StatusReportRow,
    TelemetrySample,
)

_UPSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}  # dialects with INSERT ... ON CONFLICT DO NOTHING

# ---- devices ------------------------------------------------------------------------------------------------


def get_device(s: Session, *, device_id: str) -> Device | None:
    return s.get(Device, device_id)


def ensure_device(s: Session, *, device_id: str, now: datetime) -> Device:
    """The device row, created if missing. An upsert where the database has one, so a registration through the API
    and the device's first MQTT message, arriving together, both succeed."""
    device = s.get(Device, device_id)
    if device is not None:
        return device
    _insert_device(s, device_id=device_id, now=now)
    return s.get_one(Device, device_id, populate_existing=True)


def _insert_device(s: Session, *, device_id: str, now: datetime) -> bool:
    """INSERT the device unless it exists; True if this call created it. One INSERT ... ON CONFLICT DO NOTHING where
    the database has it (it also takes SQLite's write lock first, so what follows in the transaction is serialised
    with every other writer); other databases check first and rely on the primary key (IntegrityError on a race)."""
    values = dict(id=device_id, registered_at=now, online=False, agent_version="")
    insert = _UPSERT.get(s.get_bind().dialect.name)
    if insert is None:
        if s.get(Device, device_id) is not None:
            return False
        s.add(Device(**values))
        s.flush()
        return True
    stmt = insert(Device).values(**values).on_conflict_do_nothing(index_elements=["id"]).returning(Device.id)
    return s.execute(stmt).first() is not None  # RETURNING, not rowcount: an ORM insert on PostgreSQL reports -1


def heard_from(s: Session, *, device_id: str, now: datetime) -> Device:
    """A message from the device arrived: make sure it is registered and note when it was last seen."""
    device = ensure_device(s, device_id=device_id, now=now)
    device.last_seen = now
    return device


def register_device(s: Session, *, device_id: str, groups: Sequence[str], now: datetime) -> tuple[Device, bool]:
    """Create or update a device and replace its groups; returns (device, created).

    Safe against a concurrent first MQTT message and a concurrent registration of the same device: the row is
    upserted first (so `created` is true for exactly one caller) and locked (SELECT ... FOR UPDATE: on PostgreSQL
    two registrations of one device would otherwise interleave their group changes; SQLite's write lock, taken by
    the upsert, serialises them already), then the groups are replaced with a DELETE and INSERT ... ON CONFLICT DO
    NOTHING inside the caller's transaction, never from a collection read earlier."""
    created = _insert_device(s, device_id=device_id, now=now)
    s.get_one(Device, device_id, with_for_update=True, populate_existing=True)
    wanted = sorted(set(groups))
    s.execute(delete(DeviceGroup).where(DeviceGroup.device_id == device_id, DeviceGroup.group.not_in(wanted)))
    insert = _UPSERT.get(s.get_bind().dialect.name)
    for g in wanted:
        if insert is not None:
            s.execute(insert(DeviceGroup).values(device_id=device_id, group=g).on_conflict_do_nothing())
        elif s.get(DeviceGroup, (device_id, g)) is None:
            s.add(DeviceGroup(device_id=device_id, group=g))
    s.flush()
    device = s.get_one(Device, device_id, populate_existing=True)
    s.refresh(device, ["groups"])
    return device, created


def list_devices(s: Session, *, group: str | None = None) -> list[Device]:
    q = select(Device).options(selectinload(Device.groups), selectinload(Device.tags)).order_by(Device.id)
    if group is not None:
        q = q.where(Device.id.in_(select(DeviceGroup.device_id).where(DeviceGroup.group == group)))
    return list(s.scalars(q))


def group_member_ids(group: str) -> Select[tuple[str]]:
    return select(DeviceGroup.device_id).where(DeviceGroup.group == group)


def list_groups(s: Session) -> list[tuple[str, int]]:
    """(group, number of devices), by name."""
    q = select(DeviceGroup.group, func.count()).group_by(DeviceGroup.group).order_by(DeviceGroup.group)
    return [(g, n) for g, n in s.execute(q).tuples()]


def set_tags(s: Session, *, device_id: str, tags: Mapping[str, str | None]) -> Device:
    """Set (a value) or remove (None) tags of a registered device; NotFound-free: the caller checks the device."""
    for key, value in tags.items():
        s.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id, DeviceTag.key == key))
        if value is not None:
            s.add(DeviceTag(device_id=device_id, key=key, value=value))
    s.flush()
    device = s.get_one(Device, device_id, populate_existing=True)
    s.refresh(device, ["tags"])
    return device


def count_devices(s: Session) -> tuple[int, int]:
    """(total, online)."""
    total = s.scalar(select(func.count()).select_from(Device)) or 0
    online = s.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True))) or 0
    return total, online


# ---- inbound messages ---------------------------------------------------------------------------------------


def record_presence(s: Session, *, msg: Presence, now: datetime) -> Device:
    device = heard_from(s, device_id=msg.device_id, now=now)
    apply_presence(device, msg=msg)
    return device


def apply_presence(device: Device, *, msg: Presence) -> None:
    """What a presence message says about its device (online, agent version, what it serves); not `last_seen`."""
    device.online = msg.online
    if msg.agent_version:  # free text from the device: kept to the column's size (PostgreSQL refuses longer)
        device.agent_version = msg.agent_version[:AGENT_VERSION_CHARS]
    if msg.online:  # an online device says what it serves now (None: nothing installed yet)
        device.active_name = msg.active.name if msg.active else None
        device.active_version = msg.active.version if msg.active else None


def record_telemetry(s: Session, *, msg: Telemetry, now: datetime) -> bool:
    """Store a sample once per message_id; False if it was stored before (a QoS 1 redelivery or an outbox re-send).

    One INSERT ... ON CONFLICT (message_id) DO NOTHING on SQLite and PostgreSQL, so two replicas (or two threads)
    ingesting the same redelivered sample at once store it once and neither fails. Other databases check first
    and rely on the unique constraint (an IntegrityError the caller treats as a duplicate).
    """
    heard_from(s, device_id=msg.device_id, now=now)
    values = telemetry_values(msg, now=now)
    dialect = s.get_bind().dialect.name
    if dialect in _UPSERT:
        stmt = _UPSERT[dialect](TelemetrySample).values(**values).on_conflict_do_nothing(index_elements=["message_id"])
        return s.execute(stmt.returning(TelemetrySample.id)).first() is not None  # a row back: this call stored it
    if s.scalar(select(TelemetrySample.id).where(TelemetrySample.message_id == msg.message_id)) is not None:
        return False
    s.add(TelemetrySample(**values))
    s.flush()
    return True


def telemetry_values(msg: Telemetry, *, now: datetime) -> dict[str, object]:
    """The telemetry_samples row of one sample received at `now` (a raw sample: it stands for itself alone)."""
    return dict(
        device_id=msg.device_id,
        message_id=msg.message_id,
        seq=msg.seq,
        sent_at=msg.sent_at,
        received_at=now,
        uptime_s=msg.uptime_s,
        requests_total=msg.requests_total,
        tokens_generated_total=msg.tokens_generated_total,
        tokens_per_s=msg.tokens_per_s,
        cpu_percent=msg.cpu_percent,
        memory_rss_mb=msg.memory_rss_mb,
        memory_percent=msg.memory_percent,
        samples=1,
        step_s=0,
    )


def record_status(s: Session, *, msg: StatusReport, now: datetime) -> StatusReportRow | None:
    """Append a report to the history and apply it to its deployment target; None if already recorded.

    The target's state moves only for a report about the target's bundle whose `seq` is not older than the one
    that set the current state, so a late QoS 1 redelivery cannot move a device backwards.
    """
    if s.scalar(select(StatusReportRow.id).where(StatusReportRow.message_id == msg.message_id)) is not None:
        return None
    device = heard_from(s, device_id=msg.device_id, now=now)
    row = status_row(msg, now=now)
    s.add(row)
    target = s.scalar(
        select(DeploymentTarget).where(
            DeploymentTarget.deployment_id == msg.deployment_id, DeploymentTarget.device_id == msg.device_id
        )
    )
    apply_status(msg=msg, now=now, device=device, target=target)
    s.flush()
    return row


def status_row(msg: StatusReport, *, now: datetime) -> StatusReportRow:
    """The history row of one report received at `now`."""
    return StatusReportRow(**status_values(msg, now=now))


def status_values(msg: StatusReport, *, now: datetime) -> dict[str, object]:
    """The status_reports columns of one report received at `now` (for a bulk INSERT)."""
    return dict(
        device_id=msg.device_id,
        deployment_id=msg.deployment_id,
        bundle_name=msg.bundle_name,
        bundle_version=msg.bundle_version,
        state=msg.state.value,
        active_version=msg.active_version,
        error_code=msg.error_code,
        detail=msg.detail,
        seq=msg.seq,
        message_id=msg.message_id,
        sent_at=msg.sent_at,
        received_at=now,
    )


def apply_status(*, msg: StatusReport, now: datetime, device: Device, target: DeploymentTarget | None) -> None:
    """Move the report's deployment target (None: the fleet has none) and the device's active bundle, unless the
    report is older (by `seq`) than the one that set the target's state. Reports must come in the order received."""
    fresh = target is None or msg.seq >= target.last_seq
    if target is not None and fresh and (target.deployment.bundle_name, target.deployment.bundle_version) == (
        msg.bundle_name,
        msg.bundle_version,
    ):
        target.state, target.error_code, target.detail = msg.state.value, msg.error_code, msg.detail
        target.last_seq, target.updated_at = msg.seq, now
        if msg.eval is not None:  # the score the device measured on the bundle's own held-out set
            target.eval_metric, target.eval_score, target.eval_n = msg.eval.metric, msg.eval.score, msg.eval.n
    if fresh and msg.active_version is not None:
        device.active_name, device.active_version = msg.bundle_name, msg.active_version


def status_history(s: Session, *, device_id: str, limit: int = 50) -> list[StatusReportRow]:
    """The device's last `limit` reports, oldest first (in the order the fleet received them)."""
    q = (
        select(StatusReportRow)
        .where(StatusReportRow.device_id == device_id)
        .order_by(StatusReportRow.id.desc())
        .limit(limit)
    )
    return list(reversed(s.scalars(q).all()))


def report_counts_by_state(s: Session) -> dict[str, int]:
    q = select(StatusReportRow.state, func.count()).group_by(StatusReportRow.state)
    return {state: n for state, n in s.execute(q).tuples()}


# ---- bundles ------------------------------------------------------------------------------------------------


def get_bundle(s: Session, *, name: str, version: int) -> Bundle | None:
    return s.scalar(select(Bundle).where(Bundle.name == name, Bundle.version == version))


def list_bundles(s: Session, *, name: str | None = None) -> list[Bundle]:
    q = select(Bundle).order_by(Bundle.name, Bundle.version)
    if name is not None:
        q = q.where(Bundle.name == name)
    return list(s.scalars(q))


def latest_version(s: Session, *, name: str) -> int | None:
    return s.scalar(select(func.max(Bundle.version)).where(Bundle.name == name))


def add_bundle(
    s: Session,
    *,
    manifest: Manifest,
    sha256: str,
    size: int,
    storage_path: str,
    signer_keyids: Sequence[str],
    now: datetime,
) -> Bundle:
    bundle = Bundle(
        name=manifest.name,
        version=manifest.version,
        sha256=sha256,
        size=size,
        storage_path=storage_path,
        manifest=manifest.to_signed(),
        signer_keyids=list(signer_keyids),
        uploaded_at=now,
    )
    s.add(bundle)
    s.flush()
    return bundle


# ---- deployments --------------------------------------------------------------------------------------------


def create_deployment(
    s: Session,
    *,
    deployment_id: str,
    bundle: Bundle,
    target_kind: str,
    target_value: str,
    device_ids: Sequence[str],
    now: datetime,
) -> Deployment:
    """Record the request and make `bundle` the desired bundle of every device in `device_ids`."""
    deployment = Deployment(
        id=deployment_id,
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        target_kind=target_kind,
        target_value=target_value,
        created_at=now,
    )
    deployment.targets = [
        DeploymentTarget(device_id=d, state=PENDING, detail="", last_seq=-1, created_at=now, updated_at=now)
        for d in sorted(set(device_ids))
    ]
    s.add(deployment)
    s.flush()
    return deployment


def get_deployment(s: Session, *, deployment_id: str) -> Deployment | None:
    return s.scalar(
        select(Deployment).options(selectinload(Deployment.targets)).where(Deployment.id == deployment_id)
    )


def list_deployments(s: Session, *, limit: int = 100) -> list[Deployment]:
    q = (
        select(Deployment)
        .options(selectinload(Deployment.targets))
        .order_by(Deployment.created_at.desc(), Deployment.id)
        .limit(limit)
    )
    return list(s.scalars(q))


def state_counts(deployment: Deployment) -> dict[str, int]:
    return dict(Counter(t.state for t in deployment.targets))


def desired_target(s: Session, *, device_id: str) -> DeploymentTarget | None:
    """The device's desired bundle: the target of the newest deployment that sent it a command (a rollout's wave
    that has not reached the device yet does not count, nor one its rollout stopped before reaching it)."""
    q = (
        select(DeploymentTarget)
        .options(selectinload(DeploymentTarget.deployment))
        .where(DeploymentTarget.device_id == device_id, DeploymentTarget.released_at.is_not(None))
        .order_by(DeploymentTarget.id.desc())
        .limit(1)
    )
    return s.scalar(q)


def desired_targets(s: Session, *, device_ids: Sequence[str]) -> dict[str, DeploymentTarget]:
    """`desired_target` of many devices: device id -> its newest released target (devices without one left out)."""
    out: dict[str, DeploymentTarget] = {}
    ids = sorted(set(device_ids))
    for i in range(0, len(ids), 500):
        newest = (select(func.max(DeploymentTarget.id))
                  .where(DeploymentTarget.device_id.in_(ids[i:i + 500]), DeploymentTarget.released_at.is_not(None))
                  .group_by(DeploymentTarget.device_id))
        q = (select(DeploymentTarget).options(selectinload(DeploymentTarget.deployment))
             .where(DeploymentTarget.id.in_(newest)))
        out.update({t.device_id: t for t in s.scalars(q)})
    return out


def record_commands(s: Session, *, deployment_id: str, device_ids: Sequence[str], message_ids: Sequence[str],
                    now: datetime) -> list[int]:
    """Log commands about to be sent, one per device; their ids (the commands' fleet-wide `seq`s), in order."""
    rows = [dict(deployment_id=deployment_id, device_id=d, message_id=m, sent_at=now) for d, m in zip(device_ids, message_ids)]
    s.flush()
    stmt = insert(Command).returning(Command.id, sort_by_parameter_order=True)
    return list(s.scalars(stmt, rows))


def record_command(s: Session, *, deployment_id: str, device_id: str, message_id: str, now: datetime) -> Command:
    """Log a deploy command about to be sent; its id is the command's fleet-wide `seq`."""
    command = Command(deployment_id=deployment_id, device_id=device_id, message_id=message_id, sent_at=now)
    s.add(command)
    s.flush()
    return command
