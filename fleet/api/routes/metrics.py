"""Prometheus metrics: fleet state computed from the database at scrape time (so every replica reports the same
numbers: devices and rollouts by state, status reports), and this replica's own MQTT link, ingest counters
(`fleet.ingest.IngestStats`) and outbox counters, since it started.

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

from ... import crud, outbox, overview, rollouts
from ...ingest import IngestStats
from ...models import Rollout
from ...outbox import OutboxPublisher
from ...trust import trust_for
from ..deps import FleetDep, SessionDep, metrics_access

router = APIRouter(tags=["metrics"])


class FleetCollector:
    def __init__(self, s: Session, mqtt_connected: bool, ingest: IngestStats, rejected: int,
                 root: Root | None = None, publisher: OutboxPublisher | None = None) -> None:
        self.s, self.mqtt_connected, self.ingest, self.rejected, self.root = s, mqtt_connected, ingest, rejected, root
        self.publisher = publisher

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
        yield from self.ingest_metrics()
        yield GaugeMetricFamily("slmops_outbox_unsent", "Commands in the outbox the broker has not acknowledged yet",
                                value=outbox.unsent_count(self.s))
        if self.publisher is not None:
            p = self.publisher
            yield CounterMetricFamily("slmops_outbox_published", "Commands this replica published", value=p.published)
            yield CounterMetricFamily("slmops_outbox_acknowledged", "Commands the broker acknowledged (PUBACK)",
                                      value=p.acknowledged)
            yield CounterMetricFamily("slmops_outbox_republished",
                                      "Commands published again (no PUBACK in time, or a reconnect)", value=p.republished)
        if self.root is not None:  # devices drop every command once the root expires: alert well before
            yield GaugeMetricFamily("slmops_trust_root_version", "Version of the trust root commands are signed under",
                                    value=self.root.version)
            yield GaugeMetricFamily("slmops_trust_root_expiry_timestamp_seconds",
                                    "When the current trust root expires (Unix time); rotate it before then",
                                    value=self.root.expires.timestamp())

    def ingest_metrics(self) -> Iterator[Metric]:
        st = self.ingest
        yield GaugeMetricFamily("slmops_ingest_queue_depth", "Inbound messages waiting for the ingest writer",
                                value=st.queued)
        yield CounterMetricFamily("slmops_ingest_batches", "Ingest batches committed in one transaction",
                                  value=st.batches)
        yield CounterMetricFamily("slmops_ingest_fallbacks", "Ingest batches that failed and were written one by one",
                                  value=st.fallbacks)
        yield CounterMetricFamily("slmops_ingest_messages_stored", "Inbound messages written to the database",
                                  value=st.stored)
        yield CounterMetricFamily("slmops_ingest_duplicates", "Inbound messages already stored, skipped",
                                  value=st.duplicates)
        dropped = CounterMetricFamily("slmops_ingest_dropped", "Inbound messages dropped, by reason", labels=["reason"])
        for reason, n in (("invalid", self.rejected), ("queue_full", st.dropped_full),
                          ("store_failed", st.dropped_failed), ("stopping", st.dropped_stop)):
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily("slmops_ingest_commands_resent", "Deploy commands sent again to devices back online",
                                  value=st.resent)
        yield GaugeMetricFamily("slmops_ingest_last_batch_size", "Messages in the last ingest batch",
                                value=st.last_batch_size)
        yield GaugeMetricFamily("slmops_ingest_last_batch_seconds", "Time the last ingest batch took to write",
                                value=st.last_batch_seconds)
        yield GaugeMetricFamily("slmops_ingest_last_batch_lag_seconds",
                                "From receiving the last batch's oldest message to its commit", value=st.last_batch_lag_seconds)


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
    m = fleet.messaging
    trust = trust_for(fleet.settings)
    registry.register(FleetCollector(s, m.connected, m.ingest_stats(), m.rejected, trust.root if trust is not None else None,
                                     fleet.publisher))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
