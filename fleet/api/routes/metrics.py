"""Prometheus metrics, computed from the database at scrape time so every replica reports the same numbers."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.orm import Session

from protocol.root import Root

from ... import crud
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
        yield GaugeMetricFamily(
            "slmops_mqtt_connected", "1 while this replica is subscribed on the MQTT broker", value=int(self.mqtt_connected)
        )
        if self.root is not None:  # devices drop every command once the root expires: alert well before
            yield GaugeMetricFamily("slmops_trust_root_version", "Version of the trust root commands are signed under",
                                    value=self.root.version)
            yield GaugeMetricFamily("slmops_trust_root_expiry_timestamp_seconds",
                                    "When the current trust root expires (Unix time); rotate it before then",
                                    value=self.root.expires.timestamp())


@router.get("/metrics", dependencies=[Depends(metrics_access)])
def metrics(s: SessionDep, fleet: FleetDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    trust = trust_for(fleet.settings)
    registry.register(FleetCollector(s, fleet.messaging.connected, trust.root if trust is not None else None))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
