"""Request and response bodies of the HTTP API (`XCreate` in, `XPublic` out), built from the ORM rows."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.orm import Session

from protocol.errors import clip
from protocol.manifest import BundleName, Manifest, Version
from protocol.messages import ActiveModel
from protocol.topics import check_device_id

from ..crud import state_counts
from ..auth import MAX_ENROL_TTL, MAX_TOKEN_CHARS, Role, check_enrol_device_id, check_token_name
from ..models import ApiToken, Bundle, Deployment, DeploymentTarget, Device, EnrolmentToken, Rollout, StatusReportRow
from ..strategy import TAG_KEY_RE, TAG_VALUE_RE, Gate, Strategy, TargetQuery

GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always with fullmatch: `$` lets "x\n" through


def check_group(group: str) -> str:
    if not isinstance(group, str) or len(group) > 64 or not GROUP_RE.fullmatch(group):
        raise ValueError(f"group name {clip(group)} is not valid: use 1-64 letters, digits, '.', '_', '-'")
    return group


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="device id, as its agent uses it in MQTT topics")
    groups: list[str] = Field(default_factory=list, description="groups the device belongs to (replaces earlier ones)")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_device_id(v)

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        return _groups(v)


class DesiredPublic(BaseModel):
    deployment_id: str
    bundle_name: str
    bundle_version: int
    state: str


class DevicePublic(BaseModel):
    id: str
    registered_at: datetime
    online: bool
    last_seen: datetime | None
    agent_version: str
    active: ActiveModel | None
    groups: list[str]
    tags: dict[str, str] = Field(default_factory=dict)
    revoked_at: datetime | None = None
    enrolled: bool = Field(default=False, description="the device holds broker credentials from enrolment")

    @classmethod
    def of(cls, d: Device) -> "DevicePublic":
        active = None
        if d.active_name is not None and d.active_version is not None:
            active = ActiveModel(name=d.active_name, version=d.active_version)
        return cls(
            id=d.id,
            registered_at=d.registered_at,
            online=d.online,
            last_seen=d.last_seen,
            agent_version=d.agent_version,
            active=active,
            groups=d.group_names,
            tags=d.tag_map,
            revoked_at=d.revoked_at,
            enrolled=d.broker_secret_hash is not None,
        )


class StatusReportPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    deployment_id: str
    bundle_name: str
    bundle_version: int
    state: str
    active_version: int | None
    error_code: str | None
    detail: str
    seq: int
    message_id: str
    sent_at: datetime
    received_at: datetime


class DeviceDetail(DevicePublic):
    desired: DesiredPublic | None
    history: list[StatusReportPublic]

    @classmethod
    def build(cls, d: Device, desired: DeploymentTarget | None, history: list[StatusReportRow]) -> "DeviceDetail":
        want = None
        if desired is not None:
            dep = desired.deployment
            want = DesiredPublic(
                deployment_id=dep.id, bundle_name=dep.bundle_name, bundle_version=dep.bundle_version, state=desired.state
            )
        return cls(
            **DevicePublic.of(d).model_dump(),
            desired=want,
            history=[StatusReportPublic.model_validate(r) for r in history],
        )


class BundleSummary(BaseModel):
    name: str
    version: int
    sha256: str = Field(description="sha256 of the whole bundle file")
    size: int = Field(description="bytes of the whole bundle file")
    files: int
    model_bytes: int
    base_model: str
    precision: str
    created: datetime
    expires: datetime | None
    eval: dict[str, Any]
    signer_keyids: list[str]
    uploaded_at: datetime
    download_path: str
    warning: str | None = None

    @classmethod
    def of(cls, b: Bundle, *, warning: str | None = None) -> "BundleSummary":
        m = Manifest.from_signed(b.manifest)
        return cls(
            name=b.name,
            version=b.version,
            sha256=b.sha256,
            size=b.size,
            files=len(m.files),
            model_bytes=m.total_size,
            base_model=m.base_model,
            precision=m.target.precision,
            created=m.created,
            expires=m.expires,
            eval=m.eval.model_dump(),
            signer_keyids=b.signer_keyids,
            uploaded_at=b.uploaded_at,
            download_path=f"/api/v1/bundles/{b.name}/{b.version}/file",
            warning=warning,
        )


class BundleDetail(BundleSummary):
    manifest: dict[str, Any]

    @classmethod
    def full(cls, b: Bundle) -> "BundleDetail":
        return cls(**BundleSummary.of(b).model_dump(), manifest=b.manifest)


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: BundleName = Field(description="bundle name")
    version: Version
    device_id: str | None = None
    group: str | None = None

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return None if v is None else check_device_id(v)

    @field_validator("group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        return None if v is None else check_group(v)

    @model_validator(mode="after")
    def _one_target(self) -> "DeploymentCreate":
        if (self.device_id is None) == (self.group is None):
            raise ValueError("give exactly one of device_id and group")
        return self


class TargetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    device_id: str
    state: str
    error_code: str | None
    detail: str
    updated_at: datetime


class DeploymentPublic(BaseModel):
    id: str
    bundle_name: str
    bundle_version: int
    target_kind: str
    target_value: str
    created_at: datetime
    counts: dict[str, int]
    targets: list[TargetPublic]

    @classmethod
    def of(cls, d: Deployment) -> "DeploymentPublic":
        return cls(
            id=d.id,
            bundle_name=d.bundle_name,
            bundle_version=d.bundle_version,
            target_kind=d.target_kind,
            target_value=d.target_value,
            created_at=d.created_at,
            counts=state_counts(d),
            targets=[TargetPublic.model_validate(t) for t in d.targets],
        )


def _groups(v: list[str]) -> list[str]:
    if len(v) > 256:
        raise ValueError(f"{len(v)} groups; at most 256")
    return [check_group(g) for g in v]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="what the token is for, e.g. 'ci-upload' (1-64 letters, digits, '.', '_', '@', '-')")
    role: Role
    device_id: str | None = Field(default=None, description="the device, for role 'device' only")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_token_name(v)

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return None if v is None else check_device_id(v)

    @model_validator(mode="after")
    def _device_role(self) -> "TokenCreate":
        if (self.role == "device") != (self.device_id is not None):
            raise ValueError("a token of role 'device' names its device_id; tokens of other roles name none")
        return self


class TokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    role: str
    device_id: str | None
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, t: ApiToken) -> "TokenPublic":
        return cls.model_validate(t)


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret; shown only in this answer, the fleet keeps its hash")


class EnrolmentTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[str] = Field(default_factory=list, description="groups the enrolled device joins")
    device_id: str | None = Field(default=None, description="only this device id may use the token")
    ttl_s: int = Field(default=3600, ge=1, le=int(MAX_ENROL_TTL.total_seconds()), description="seconds until it expires")

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        return _groups(v)

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return None if v is None else check_enrol_device_id(v)


class EnrolmentTokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    groups: list[str]
    device_id: str | None
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_device: str | None
    created_by: str

    @classmethod
    def of(cls, t: EnrolmentToken) -> "EnrolmentTokenPublic":
        return cls.model_validate(t)


class EnrolmentTokenCreated(EnrolmentTokenPublic):
    token: str = Field(description="the one-time secret; shown only in this answer")


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=MAX_TOKEN_CHARS, description="the one-time enrolment token")
    device_id: str

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_enrol_device_id(v)


class EnrolResponse(BaseModel):
    device_id: str
    broker_username: str
    broker_password: str = Field(description="shown only in this answer; the fleet keeps its hash")
    api_token: str = Field(description="the device's API token (role 'device'), for bundle downloads")
    broker_url: str
    fleet_url: str


class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str


# ---- rollouts -----------------------------------------------------------------------------------------------


class BundleKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: BundleName
    version: Version


class RolloutTarget(BaseModel):
    """A group, or a tag query ("site=berlin,tier=a"; the key `group` means membership)."""

    model_config = ConfigDict(extra="forbid")
    group: str | None = None
    query: str | None = Field(default=None, max_length=600)

    @field_validator("group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        return None if v is None else check_group(v)

    @model_validator(mode="after")
    def _one(self) -> "RolloutTarget":
        if (self.group is None) == (self.query is None):
            raise ValueError("give exactly one of group and query")
        TargetQuery.parse(self.query) if self.query is not None else None
        return self

    def parsed(self) -> TargetQuery:
        return TargetQuery.group(self.group) if self.group is not None else TargetQuery.parse(self.query or "")


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: BundleKey
    target: RolloutTarget
    strategy: Strategy = Strategy()
    gate: Gate = Gate()


class RolloutControl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rollback: bool = False  # cancel: send the devices this rollout updated back to the bundle they had


class WavePublic(BaseModel):
    index: int
    name: str
    state: str
    size: int
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, int]
    score: dict[str, Any] | None


class RolloutPublic(BaseModel):
    id: str
    state: str
    reason: str
    bundle: dict[str, Any]
    target: dict[str, str]
    strategy: dict[str, Any]
    gate: dict[str, Any]
    current_wave: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    waves: list[WavePublic]
    counts: dict[str, int]

    @classmethod
    def of(cls, s: Session, r: Rollout) -> "RolloutPublic":
        """The rollout with each wave's counts and measured score (fleet.rollout_counts: a few GROUP BY queries)."""
        from ..rollout_counts import COUNT_KEYS, by_wave, wave_scores

        s.flush()
        waves, scores = by_wave(s, r), wave_scores(s, r)
        total = {k: sum(c[k] for c in waves.values()) for k in COUNT_KEYS}
        return cls(
            id=r.id, state=r.state, reason=r.reason,
            bundle={"name": r.deployment.bundle_name, "version": r.deployment.bundle_version},
            target={"query": r.query}, strategy=r.strategy, gate=r.gate, current_wave=r.current_wave,
            created_by=r.created_by, created_at=r.created_at, updated_at=r.updated_at,
            waves=[WavePublic(index=w.index, name=w.name, state=w.state, size=w.size, started_at=w.started_at,
                              finished_at=w.finished_at, counts=waves.get(w.index) or dict.fromkeys(COUNT_KEYS, 0),
                              score=scores.get(w.index))
                   for w in r.waves],
            counts=total,
        )  # fmt: skip


class RolloutList(BaseModel):
    rollouts: list[RolloutPublic]


class TagsUpdate(BaseModel):
    """Tags to set (a value) or remove (null) on a device."""

    model_config = ConfigDict(extra="forbid")
    tags: dict[str, str | None] = Field(max_length=32)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for key, value in v.items():
            if not TAG_KEY_RE.fullmatch(key) or key == "group":
                raise ValueError(f"tag key {clip(key)} is not valid: 1-32 of a-z, 0-9, '.', '_', '-' starting with a "
                                 "letter, and not 'group'")
            if value is not None and not TAG_VALUE_RE.fullmatch(value):
                raise ValueError(f"tag value {clip(value)} is not valid: 1-64 letters, digits, '.', '_', '-'")
        return v
