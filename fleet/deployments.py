"""Deployments: turn "bundle B to device D / group G" into desired state in the database and deploy commands.

Workflow: `plan_deployment` records a deployment to one device, its target row and the signed `DeployCommand`,
queued in the outbox (fleet/outbox.py) in the caller's transaction, so the command goes out only once the decision
is committed (and a device's first status report always finds its target row). A deployment to a group or a tag
query is a rollout (fleet/rollouts.py; a plain one sends to every device at once). `commands_to_resend` re-issues
the command for a device that comes back online while its desired bundle is neither installed nor finished,
because a command sent while it was away may be lost. A device therefore may receive the same deployment more than
once and must treat `deployment_id` as idempotent.

Every command is logged in the `commands` table first; that row's autoincrement id is the command's `seq`, so
seq grows across the whole fleet and replicas sharing the database never hand out the same number. With a trust
folder (`settings.trust_dir`, fleet/trust.py) every command is signed with its command key under the current root's
version; devices drop unsigned commands and any seq they have already passed, so a resend always takes a new row.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy.orm import Session

from collections.abc import Sequence
from typing import TypeVar

from protocol.messages import BundleRef, CancelCommand, DeployCommand, UpdateState

from . import crud, outbox
from .errors import DeviceRevokedError, NotFoundError
from .models import Bundle, Deployment, DeploymentTarget, Rollout
from .settings import Settings
from .trust import trust_for

C = TypeVar("C", DeployCommand, CancelCommand)
TERMINAL = frozenset(s.value for s in UpdateState if s.terminal)  # target states after which nothing is resent


def plan_deployment(
    s: Session,
    *,
    settings: Settings,
    bundle_name: str,
    version: int,
    device_id: str,
    now: datetime,
) -> Deployment:
    """Record `bundle_name` v`version` as the device's desired bundle and queue its command in the outbox."""
    bundle = crud.get_bundle(s, name=bundle_name, version=version)
    if bundle is None:
        raise NotFoundError(f"bundle {bundle_name} v{version} is not stored; upload it first (POST /api/v1/bundles)")
    device = crud.get_device(s, device_id=device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not registered; register it (POST /api/v1/devices) or start its agent")
    if device.revoked_at is not None:
        raise DeviceRevokedError(f"device {device_id!r} is revoked; reinstate it and enrol it again before deploying to it")
    deployment = crud.create_deployment(
        s,
        deployment_id=uuid.uuid4().hex,
        bundle=bundle,
        target_kind="device",
        target_value=device_id,
        device_ids=[device_id],
        now=now,
    )
    for target in deployment.targets:
        target.prev_name, target.prev_version = device.active_name, device.active_version
        target.released_at = target.asked_at = now
        target.attempts = 1
        command = deploy_command(s, settings=settings, deployment_id=deployment.id, bundle=bundle,
                                 device_id=device_id, now=now)
        outbox.enqueue(s, command, now=now)
    return deployment


def commands_to_resend(s: Session, *, settings: Settings, device_id: str, now: datetime) -> list[DeployCommand]:
    return commands_to_resend_many(s, settings=settings, device_ids=[device_id], now=now)


def commands_to_resend_many(s: Session, *, settings: Settings, device_ids: Sequence[str],
                            now: datetime) -> list[DeployCommand]:
    """`commands_to_resend` for many devices that came online at once (one ingest batch): a few queries for all of
    them, and one INSERT for the commands of each deployment."""
    wanted: dict[str, list[DeploymentTarget]] = {}
    for target in crud.desired_targets(s, device_ids=device_ids).values():
        if target.state in TERMINAL:
            continue
        device = crud.get_device(s, device_id=target.device_id)
        deployment = target.deployment
        if device is not None and device.revoked_at is not None:
            continue  # revoked: it cannot read commands anyway, and must not be sent any
        if device is not None and (device.active_name, device.active_version) == (
            deployment.bundle_name,
            deployment.bundle_version,
        ):
            continue
        wanted.setdefault(deployment.id, []).append(target)
    out: list[DeployCommand] = []
    for deployment_id, targets in sorted(wanted.items()):
        deployment = targets[0].deployment
        bundle = crud.get_bundle(s, name=deployment.bundle_name, version=deployment.bundle_version)
        if bundle is None:
            continue
        for target in targets:
            target.asked_at, target.attempts = now, target.attempts + 1
        rollout = s.get(Rollout, deployment_id)
        download_only = bool(rollout is not None and rollout.strategy.get("download_only"))
        out += deploy_commands(s, settings=settings, deployment_id=deployment_id, bundle=bundle,
                               device_ids=[t.device_id for t in targets], now=now, download_only=download_only)
    return out


def deploy_command(
    s: Session, *, settings: Settings, deployment_id: str, bundle: Bundle, device_id: str, now: datetime,
    download_only: bool = False,
) -> DeployCommand:
    [cmd] = deploy_commands(s, settings=settings, deployment_id=deployment_id, bundle=bundle, device_ids=[device_id],
                            now=now, download_only=download_only)
    return cmd


def deploy_commands(
    s: Session, *, settings: Settings, deployment_id: str, bundle: Bundle, device_ids: Sequence[str], now: datetime,
    download_only: bool = False,
) -> list[DeployCommand]:
    """One signed DeployCommand per device, in order; their `commands` rows (whose ids are the seqs) are written
    with one multi-row INSERT ... RETURNING, so a wave of thousands costs one statement, not one flush each."""
    if not device_ids:
        return []
    message_ids = [uuid.uuid4().hex for _ in device_ids]
    seqs = crud.record_commands(s, deployment_id=deployment_id, device_ids=device_ids, message_ids=message_ids, now=now)
    ref = BundleRef(name=bundle.name, version=bundle.version, url=settings.bundle_url(bundle.name, bundle.version),
                    sha256=bundle.sha256, size=bundle.size)
    return [sign(settings, DeployCommand(message_id=m, seq=seq, sent_at=now, deployment_id=deployment_id, device_id=d,
                                         bundle=ref, download_only=download_only))
            for d, m, seq in zip(device_ids, message_ids, seqs)]


def sign(settings: Settings, cmd: C) -> C:
    """The command signed with the fleet's command key under the current root; unsigned without a trust folder."""
    trust = trust_for(settings)
    return trust.sign(cmd) if trust is not None else cmd
