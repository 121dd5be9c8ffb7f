"""Prometheus metrics, computed from the database at scrape time so every replica reports the same numbers.

`deploy/grafana/slmops-fleet.json` plots these; `tests/fleet/test_dashboard_api.py` checks that every metric it
names is one this endpoint exports, so renaming one here means changing the dashboard too."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from protocol.root import Root

from ... import crud, overview, rollouts
from ...models import Rollout
from ...trust import trust_for
from ..deps import FleetDep, SessionDep, metrics_access

router = APIRouter(tags=["metrics"])


class FleetCollector:
    def __init__(self, s: Session, mqtt_connected: bool, root: Root | None = None) -> None:
        self.s, self.mqtt_connected, self.root = s, mqtt_connected, root

    def collect(self) -> Iterator[Metric]:
        total, online = crud.count_devices(self.s)
        yield GaugeMetricFamily("slmops_devices", "Registered devices", value=total)
        yield GaugeMetricFamily("slmops_devices_online", "Devices whose last presence said online", value=online)
        reports = CounterMetricFamily("slmops_status_reports", "Status reports received, by state", labels=["state"])
        for state, n in sorted(crud.report_counts_by_state(self.s).items()):
            reports.add_metric([state], n)
        yield reports
        yield from state_metrics(self.s)
        yield GaugeMetricFamily(
            "slmops_mqtt_connected", "1 while this replica is subscribed on the MQTT broker", value=int(self.mqtt_connected)
        )
        if self.root is not None:  # devices drop every command once the root expires: alert well before
            yield GaugeMetricFamily("slmops_trust_root_version", "Version of the trust root commands are signed under",
                                    value=self.root.version)
            yield GaugeMetricFamily("slmops_trust_root_expiry_timestamp_seconds",
                                    "When the current trust root expires (Unix time); rotate it before then",
                                    value=self.root.expires.timestamp())


ROLLOUT_STATES = (rollouts.RUNNING, rollouts.PAUSED, rollouts.SUCCEEDED, rollouts.ABORTED, rollouts.CANCELLED,
                  rollouts.SUPERSEDED)


def state_metrics(s: Session) -> Iterator[Metric]:
    """Devices by state (online, offline, revoked) and rollouts by state (a sample for every state, 0 included)."""
    st = overview.device_states(s)
    devices = GaugeMetricFamily("slmops_devices_by_state", "Devices by state (online and offline exclude revoked)",
                                labels=["state"])
    for state, n in (("online", st.online), ("offline", st.offline), ("revoked", st.revoked)):
        devices.add_metric([state], n)
    yield devices
    family = GaugeMetricFamily("slmops_rollouts", "Rollouts by state", labels=["state"])
    counts = {state: n for state, n in s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)).tuples()}
    for state in sorted(set(ROLLOUT_STATES) | set(counts)):
        family.add_metric([str(state)], counts.get(state, 0))
    yield family


@router.get("/metrics", dependencies=[Depends(metrics_access)])
def metrics(s: SessionDep, fleet: FleetDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    trust = trust_for(fleet.settings)
    registry.register(FleetCollector(s, fleet.messaging.connected, trust.root if trust is not None else None))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
