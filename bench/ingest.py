"""Fleet ingest measurement (not a test): `python -m bench.ingest [--n 5000] [--devices 20] [--broker mosquitto]
[--status-every 5]`.

Workflow: for each path, old then new, on a fresh SQLite file:
- "old": the fleet's own `FleetMessaging` with its writer replaced by what the fleet did before fleet/ingest.py:
  each message stored in its own transaction on paho's network thread (resends published from there too);
- "new": `FleetMessaging` as shipped: paho's thread only parses and queues, one writer thread stores in batches.
Each path is driven twice: "direct" hands N payloads to `FleetMessaging.ingest` from one thread (the database path
alone, no network), and "mqtt" has `--devices` paho clients publish N messages at QoS 1 through a real broker
(mosquitto when installed, from a config file the bench writes: `max_queued_messages 0` so the broker itself drops
nothing, the fleet on MQTT 5 so its Receive Maximum sets how many unacknowledged messages mosquitto sends it; else
the embedded amqtt broker on MQTT 3.1.1) to the fleet's real paho client, which acknowledges each message after its
commit. Every `--status-every`th message is a status report (default 5: 80 % telemetry; 0: telemetry only, the
ingest target's case), each message unique.
Stored is counted in the database; lost = sent - stored once nothing has arrived for `--settle` seconds.
Writes `bench/results/ingest-<time>.json` and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from fleet.db import open_database
from fleet.ingest import Item, no_ack, store_message
from fleet.messaging import FleetMessaging
from fleet.models import StatusReportRow, TelemetrySample
from fleet.settings import Settings
from mqttlink.buffered import BufferedClient
from protocol import topics
from protocol.messages import StatusReport, Telemetry, UpdateState, encode
from slmops.story import free_port, wait_port

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def payloads(n: int, devices: int, status_every: int = 5) -> list[tuple[str, str, bytes]]:
    """(device, topic, payload) for n unique messages spread over the devices: every `status_every`th a status
    report (0: none)."""
    out = []
    for i in range(n):
        dev = f"dev-{i % devices:04d}"
        if status_every and i % status_every == status_every - 1:
            msg = StatusReport(device_id=dev, deployment_id="dep-bench", bundle_name="tiny", bundle_version=1,
                               state=UpdateState.DOWNLOADING, seq=i, sent_at=NOW)
            out.append((dev, str(topics.status(dev)), encode(msg)))
        else:
            msg = Telemetry(device_id=dev, uptime_s=i, requests_total=i, tokens_generated_total=i, tokens_per_s=1.0,
                            cpu_percent=10, memory_rss_mb=100, memory_percent=5, seq=i, sent_at=NOW)
            out.append((dev, str(topics.telemetry(dev)), encode(msg)))
    return out


def make_old(fleet: FleetMessaging) -> None:
    """Turn `fleet` into the old path: one transaction per message, on the calling (paho's) thread."""

    def store_now(msg, ack=no_ack) -> bool:
        try:
            with fleet.sessions() as s, s.begin():
                _, resend = store_message(s, Item(msg, datetime.now(timezone.utc)), fleet.settings)
        except Exception:  # the old path logged and dropped; the count of stored rows shows any loss
            return False
        finally:
            ack()
        for command in resend:
            fleet.publish_deploy(command)
        return True

    fleet.writer.submit = store_now  # type: ignore[method-assign]


def stored(sessions) -> int:
    with sessions() as s:
        return (s.scalar(select(func.count()).select_from(TelemetrySample)) or 0) + (
            s.scalar(select(func.count()).select_from(StatusReportRow)) or 0)


def wait_stored(sessions, n: int, t0: float, settle: float) -> tuple[int, float]:
    """Poll until n rows are stored or nothing new arrived for `settle` seconds; (rows, seconds from t0 to the
    last new row)."""
    last, last_at = -1, time.monotonic()
    while True:
        got = stored(sessions)
        if got != last:
            last, last_at = got, time.monotonic()
        if got >= n or time.monotonic() - last_at > settle:
            return got, last_at - t0
        time.sleep(0.05)


class Broker:
    """mosquitto (anonymous, loopback, nothing dropped for a slow subscriber) or the embedded amqtt broker."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.port = kind, free_port()
        if kind == "mosquitto":
            conf = tmp / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                            "max_queued_messages 0\n"  # a slow subscriber (the fleet) never loses a QoS 1 message
                            "max_inflight_messages 100\n"  # MQTT 3.1.1 clients; the fleet's MQTT 5 Receive Maximum wins
                            + ("user root\n" if os.geteuid() == 0 else ""))
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            wait_port(self.port)
        else:
            from fleet.acl import Principal
            from fleet.broker import EmbeddedBroker

            class Anyone:  # the bench's devices and fleet, each by its user name
                def authenticate(self, username, password):
                    if username == "fleet":
                        return Principal("fleet")
                    return Principal("device", username) if username else None

            self.broker = EmbeddedBroker("127.0.0.1", self.port, authenticator=Anyone())
            self.broker.start()

    def stop(self) -> None:
        if self.kind == "mosquitto":
            self.proc.terminate()
            self.proc.wait(10)
        else:
            self.broker.stop()


def publish_from_devices(port: int, by_dev: dict[str, list], ready, go, finished) -> None:
    """In its own process: one paho client per device, each publishing its messages at QoS 1 once `go` is set, then
    waiting until the broker acknowledged them all; the devices stay connected until `finished` (amqtt 0.12.1 drops
    the acknowledged messages of a client that disconnects before it has routed them)."""
    clients = []
    for dev in by_dev:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"slmops-agent-{dev}")
        c.username_pw_set(dev, "bench-device-password")
        c.max_inflight_messages_set(100)
        c.connect("127.0.0.1", port, 60)
        c.loop_start()
        clients.append(c)
    time.sleep(0.5)
    ready.set()
    go.wait(60)

    def send(c: mqtt.Client, items: list) -> None:
        infos = [c.publish(topic, payload, qos=1) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(60)

    senders = [threading.Thread(target=send, args=(c, items)) for c, items in zip(clients, by_dev.values())]
    for s in senders:
        s.start()
    for s in senders:
        s.join()
    finished.wait(600)
    for c in clients:
        c.disconnect()
        c.loop_stop()


def run_once(path: str, mode: str, msgs: list, args: argparse.Namespace, tmp: Path, broker: Broker | None,
             reads: str = "buffered") -> dict:
    """One run; `reads` "paho" makes the fleet's client read its socket the way paho does by itself (one small
    recv() per packet part), "buffered" as shipped (mqttlink.buffered), to compare the two side by side."""
    import mqttlink.client

    mqttlink.client.BufferedClient = BufferedClient if reads == "buffered" else mqtt.Client  # type: ignore[misc]
    work = tmp / f"{path}-{mode}-{reads}"
    scheme = "mqtt5" if broker is not None and broker.kind == "mosquitto" else "mqtt"
    settings = Settings(data_dir=work, broker_url=f"{scheme}://127.0.0.1:{broker.port if broker else 1}",
                        client_id=f"slmops-fleet-bench-{path}-{mode}-{reads}-{tmp.name}", broker_password="bench-" + "x" * 20)
    db = open_database(settings.database_url)
    fleet = FleetMessaging(settings, db.sessions)
    if path == "old":
        make_old(fleet)
    devices, finished = None, multiprocessing.Event()
    try:
        if mode == "direct":
            fleet.writer.start()
            t0 = time.monotonic()
            for _, topic, payload in msgs:
                fleet.ingest(topic, payload)
        else:
            fleet.start()
            if not fleet.wait_connected(10):
                raise RuntimeError("the fleet did not subscribe on the bench broker")
            by_dev: dict[str, list] = {}
            for dev, topic, payload in msgs:
                by_dev.setdefault(dev, []).append((topic, payload))
            ready, go = multiprocessing.Event(), multiprocessing.Event()
            devices = multiprocessing.Process(target=publish_from_devices,
                                              args=(broker.port, by_dev, ready, go, finished))  # type: ignore[union-attr]
            devices.start()  # the devices live in their own process, as they would on their own machines
            if not ready.wait(30):
                raise RuntimeError("the bench's devices did not connect")
            t0 = time.monotonic()
            go.set()
        got, seconds = wait_stored(db.sessions, len(msgs), t0, args.settle)
        finished.set()
        st = fleet.ingest_stats()
        return {"path": path, "mode": mode, "reads": reads, "sent": len(msgs), "stored": got, "lost": len(msgs) - got,
                "seconds": round(seconds, 3), "stored_per_s": round(got / seconds, 1) if seconds > 0 else None,
                "batches": st.batches, "last_batch_size": st.last_batch_size, "dropped": st.dropped}
    finally:
        finished.set()
        if devices is not None:
            devices.join(30)
            if devices.is_alive():
                devices.terminate()
        fleet.stop() if mode != "direct" else fleet.writer.stop()
        db.close()
        if mode != "direct" and broker is not None:
            forget_session(broker.port, settings.client_id)


def forget_session(port: int, client_id: str) -> None:
    """End the run's persistent session at the broker, so it does not queue the next run's messages (which a later
    run with the same client id would then receive at once, and which would cost the broker meanwhile)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.username_pw_set("fleet", "bench-" + "x" * 20)
    try:
        c.connect("127.0.0.1", port)
        c.loop_start()
        time.sleep(0.3)
        c.disconnect()
        c.loop_stop()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="messages per run")
    p.add_argument("--devices", type=int, default=20, help="publishing device clients in the mqtt runs")
    p.add_argument("--broker", choices=["mosquitto", "embedded", "none"], default="mosquitto" if MOSQUITTO else "embedded")
    p.add_argument("--paths", default="old,new", help="which paths to run, comma-separated: old, new")
    p.add_argument("--status-every", type=int, default=5, help="every Nth message a status report; 0: telemetry only")
    p.add_argument("--settle", type=float, default=10.0, help="seconds without a new row before counting the rest lost")
    p.add_argument("--reads", default="buffered", help="how the fleet's MQTT client reads, comma-separated: buffered "
                   "(as shipped), paho (paho's own small reads); 'paho,buffered,paho,buffered' alternates them")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    msgs = payloads(args.n, args.devices, args.status_every)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        tmp = Path(d)
        broker = Broker(args.broker, tmp) if args.broker != "none" else None
        try:
            for mode in ("direct", "mqtt") if broker else ("direct",):
                for path in [x for x in ("old", "new") if x in args.paths.split(",")]:
                    for i, reads in enumerate(args.reads.split(",") if mode == "mqtt" else ["buffered"]):
                        r = run_once(path, mode, msgs, args, tmp / str(i), broker, reads)
                        results.append(r)
                        print(f"{mode:6} {path} ({reads} reads): {r['stored']}/{r['sent']} stored in {r['seconds']} s "
                              f"= {r['stored_per_s']}/s, lost {r['lost']}, batches {r['batches']}", flush=True)
        finally:
            if broker:
                broker.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"ingest-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    settings = Settings(data_dir=Path(tempfile.gettempdir()))
    out.write_text(json.dumps({
        "when": datetime.now(timezone.utc).isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "broker": args.broker, "n": args.n, "devices": args.devices,
        "status_every": args.status_every,
        "ingest_settings": {k: getattr(settings, k) for k in ("ingest_queue_max", "ingest_batch_max",
                                                              "ingest_batch_wait_ms", "ingest_receive_maximum")},
        "load_average_at_end": os.getloadavg(), "runs": results,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
