"""The fleet's tables: every piece of fleet state lives here, so any replica can rebuild what another knew.

    devices             one row per device: presence, last contact, what it serves
    device_groups       which groups a device belongs to (many per device)
    bundles             stored bundle files with their signed manifest
    deployments         an operator's request: this bundle to that device or group
    deployment_targets  each target device's desired bundle and the last state it reported for it
    commands            every deploy command sent; its autoincrement id is the command's `seq`
    rollouts            a deployment sent in waves: strategy, gate, state (fleet/rollouts.py); id == deployment id
    rollout_waves       each wave's planned size and state
    device_tags         key=value tags that target queries select devices by
    outbox              signed commands waiting for the one publisher (fleet/outbox.py); sent_at set on PUBACK
    status_reports      append-only history of what devices reported (deduplicated by message_id)
    telemetry_samples   numeric health samples (deduplicated by message_id); older ones rolled up per device and
                        step (fleet/retention.py): `samples` raw samples in one row of `step_s` seconds
    api_tokens          bearer tokens of the HTTP API with their role (stored as sha256 hashes only)
    enrolment_tokens    one-time tokens a device trades for its own credentials (hashes only)
    audit_log           who changed what, when (append-only)

Timestamps are stored as naive UTC and come back timezone-aware (`UTCDateTime`), on SQLite and PostgreSQL alike.
The schema is built by the Alembic revisions in fleet/migrations, never by create_all: a change here needs a new
revision (fleet/migrations/README.md), and tests/fleet/test_migrations.py fails until it has one.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

PENDING = "pending"  # a deployment target's state before the device reports anything
AGENT_VERSION_CHARS = 64  # characters of a device's agent_version kept (the presence message does not bound it)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps stored by the fleet must be timezone-aware")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None else None


# Every integer is 64-bit: versions, sizes, seqs and counters go up to protocol.manifest.MAX_VERSION (2**63 - 1),
# and ids of append-only tables outgrow 32 bits (telemetry at 10,000 samples/s in under three days). On SQLite,
# where every INTEGER is 64-bit already, the type stays INTEGER: only "INTEGER PRIMARY KEY" is the rowid.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, int: BigInt}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    registered_at: Mapped[datetime]
    online: Mapped[bool] = mapped_column(default=False)
    last_seen: Mapped[datetime | None]
    agent_version: Mapped[str] = mapped_column(String(AGENT_VERSION_CHARS), default="")
    active_name: Mapped[str | None] = mapped_column(String(64))
    active_version: Mapped[int | None]
    broker_secret_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 hex of its MQTT password; None: none
    revoked_at: Mapped[datetime | None]  # set: refused by the broker and the API until an admin reinstates it

    groups: Mapped[list[DeviceGroup]] = relationship(
        back_populates="device", cascade="all, delete-orphan", order_by="DeviceGroup.group"
    )
    tags: Mapped[list[DeviceTag]] = relationship(cascade="all, delete-orphan", order_by="DeviceTag.key")

    @property
    def group_names(self) -> list[str]:
        return [g.group for g in self.groups]

    @property
    def tag_map(self) -> dict[str, str]:
        return {t.key: t.value for t in self.tags}


class DeviceGroup(Base):
    __tablename__ = "device_groups"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    group: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)

    device: Mapped[Device] = relationship(back_populates="groups")


class Bundle(Base):
    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]
    storage_path: Mapped[str] = mapped_column(Text)  # relative to the bundle store's root
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)  # the signed manifest ("signed" of the envelope)
    signer_keyids: Mapped[list[str]] = mapped_column(JSON, default=list)
    uploaded_at: Mapped[datetime]


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    bundle_name: Mapped[str] = mapped_column(String(64))
    bundle_version: Mapped[int]
    target_kind: Mapped[str] = mapped_column(String(16))  # "device" | "group"
    target_value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]

    targets: Mapped[list[DeploymentTarget]] = relationship(
        back_populates="deployment", cascade="all, delete-orphan", order_by="DeploymentTarget.device_id"
    )


class DeploymentTarget(Base):
    __tablename__ = "deployment_targets"
    __table_args__ = (
        UniqueConstraint("deployment_id", "device_id"),
        Index("ix_deployment_targets_device", "device_id", "id"),
        {"sqlite_autoincrement": True},  # the newest target of a device has the highest id
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(32), default=PENDING)  # an UpdateState value or "pending"
    error_code: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    last_seq: Mapped[int] = mapped_column(default=-1)  # seq of the report that set `state`; older ones are ignored
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    wave: Mapped[int | None]  # rollouts: the wave this device belongs to; None for a plain deployment
    released_at: Mapped[datetime | None]  # when its first command was queued; None: its wave has not reached it yet
    asked_at: Mapped[datetime | None]  # when a command was last queued for it (first or repeated)
    attempts: Mapped[int] = mapped_column(default=0)  # commands queued for it
    timed_out_at: Mapped[datetime | None]  # set once it passed the rollout's device timeout without finishing
    prev_name: Mapped[str | None] = mapped_column(String(64))  # what it served when released: the rollback target
    prev_version: Mapped[int | None]
    eval_metric: Mapped[str | None] = mapped_column(String(64))  # the score the device measured on the bundle's
    eval_score: Mapped[float | None]  # own held-out set in its health check (aggregate only)
    eval_n: Mapped[int | None]

    deployment: Mapped[Deployment] = relationship(back_populates="targets")


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # running|paused|succeeded|aborted|cancelled|superseded
    reason: Mapped[str] = mapped_column(Text, default="")  # the last transition, in words
    query: Mapped[str] = mapped_column(String(600))  # the target query ("group=lab", "site=berlin,tier=a")
    strategy: Mapped[dict[str, Any]] = mapped_column(JSON)  # fleet.strategy.Strategy
    gate: Mapped[dict[str, Any]] = mapped_column(JSON)  # fleet.strategy.Gate
    current_wave: Mapped[int] = mapped_column(default=0)  # the newest wave started
    created_by: Mapped[str] = mapped_column(String(160), default="")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    deployment: Mapped[Deployment] = relationship()
    waves: Mapped[list[RolloutWave]] = relationship(
        back_populates="rollout", cascade="all, delete-orphan", order_by="RolloutWave.index"
    )


class RolloutWave(Base):
    __tablename__ = "rollout_waves"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(32))
    size: Mapped[int]
    state: Mapped[str] = mapped_column(String(16))  # waiting | running | succeeded | failed
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    rollout: Mapped[Rollout] = relationship(back_populates="waves")


class DeviceTag(Base):
    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(64), index=True)


class OutboxMessage(Base):
    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unsent", "sent_at", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    topic: Mapped[str] = mapped_column(String(256))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]  # when the broker acknowledged it (QoS 1 PUBACK); None: still to send


class Command(Base):
    __tablename__ = "commands"
    __table_args__ = {"sqlite_autoincrement": True}  # ids never reused, so seq only grows

    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    sent_at: Mapped[datetime]


class StatusReportRow(Base):
    __tablename__ = "status_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    deployment_id: Mapped[str] = mapped_column(String(128), index=True)  # protocol: 1-128 chars
    bundle_name: Mapped[str] = mapped_column(String(64))
    bundle_version: Mapped[int]
    state: Mapped[str] = mapped_column(String(32))
    active_version: Mapped[int | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    seq: Mapped[int]
    message_id: Mapped[str] = mapped_column(String(128), unique=True)  # protocol: 1-128 chars
    sent_at: Mapped[datetime]
    received_at: Mapped[datetime]


class TelemetrySample(Base):
    __tablename__ = "telemetry_samples"
    __table_args__ = (
        Index("ix_telemetry_device_time", "device_id", "received_at"),
        Index("ix_telemetry_step_time", "step_s", "received_at"),  # retention: raw rows (step 0) by age, rollups by age
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(String(128), unique=True)  # a QoS 1 redelivery is stored once
    seq: Mapped[int]
    sent_at: Mapped[datetime]  # when the device sampled it; later than received_at only by clock skew
    received_at: Mapped[datetime]  # a sample that waited in the device's outbox arrives late
    uptime_s: Mapped[float]
    requests_total: Mapped[int]
    tokens_generated_total: Mapped[int]
    tokens_per_s: Mapped[float]
    cpu_percent: Mapped[float]
    memory_rss_mb: Mapped[float]
    memory_percent: Mapped[float]
    samples: Mapped[int] = mapped_column(default=1, server_default="1")  # raw samples this row stands for: 1 if raw
    step_s: Mapped[int] = mapped_column(default=0, server_default="0")  # seconds a rollup row covers; 0: a raw sample


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(160))  # given by an admin, or "device:<id>" for enrolled devices
    role: Mapped[str] = mapped_column(String(16))  # admin | operator | viewer | device
    device_id: Mapped[str | None] = mapped_column(String(128), index=True)  # set for role "device" only
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the token itself is never stored
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(160))
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class EnrolmentToken(Base):
    __tablename__ = "enrolment_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)  # the enrolled device's groups
    device_id: Mapped[str | None] = mapped_column(String(128))  # set: only this device id may enrol with it
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    used_by_device: Mapped[str | None] = mapped_column(String(128))
    created_by: Mapped[str] = mapped_column(String(160))


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = {"sqlite_autoincrement": True}  # ids never reused: the log reads in order

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(160))  # a token's name, "bootstrap" or "device:<id>"
    action: Mapped[str] = mapped_column(String(64))  # e.g. "token.created", "device.revoked"
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text, default="")  # at most AUDIT_DETAIL_CHARS characters
