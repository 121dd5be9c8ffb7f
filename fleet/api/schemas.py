"""Request and response bodies of the HTTP API (`XCreate` in, `XPublic` out), built from the ORM rows."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.errors import clip
from protocol.manifest import BundleName, Manifest, Version
from protocol.messages import ActiveModel
from protocol.topics import check_device_id

from ..crud import state_counts
from ..models import Bundle, Deployment, DeploymentTarget, Device, StatusReportRow

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
        if len(v) > 256:
            raise ValueError(f"{len(v)} groups; at most 256")
        return [check_group(g) for g in v]


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
