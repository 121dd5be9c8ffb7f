"""A fleet that stores its first batch, then hangs before its next commit, for tests to kill with SIGKILL.

`python -m tests.fleet.crashing_fleet BROKER_URL CLIENT_ID DATABASE_URL` (fleet password in SLMOPS_TEST_FLEET_PASSWORD)
runs the fleet's real `FleetMessaging` (manual acks, persistent session) with batches of `BATCH` messages; the first
batch is committed and acknowledged as usual, every later one waits forever inside its transaction. It prints
`subscribed` once the broker acknowledged its subscriptions and `received N` each time paho hands it a message.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from fleet.db import open_database
from fleet.inbound import store_batch
from fleet.messaging import FleetMessaging
from fleet.settings import Settings

BATCH = 5  # messages in the one batch that is committed before the hang


def main(broker_url: str, client_id: str, database_url: str) -> None:
    settings = Settings(data_dir=Path(database_url.removeprefix("sqlite:///")).parent, database_url=database_url,
                        broker_url=broker_url, client_id=client_id, ingest_batch_max=BATCH, ingest_batch_wait_ms=500,
                        broker_password=os.environ["SLMOPS_TEST_FLEET_PASSWORD"])
    db = open_database(settings.database_url)
    fleet = FleetMessaging(settings, db.sessions)
    batches, hang, lock, received = [], threading.Event(), threading.Lock(), [0]

    def store(s, items, st):
        batches.append(len(items))
        if len(batches) > 1:
            hang.wait()  # never set: the process is killed in here, its transaction open
        return store_batch(s, items, st)

    fleet.writer.store = store
    submit = fleet.writer.submit

    def counting(msg, ack):
        ok = submit(msg, ack)
        with lock:
            received[0] += 1
            print(f"received {received[0]}", flush=True)
        return ok

    fleet.writer.submit = counting
    fleet.start()
    if not fleet.wait_connected(10):
        print("not subscribed", flush=True)
        sys.exit(1)
    print("subscribed", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(*sys.argv[1:4])
