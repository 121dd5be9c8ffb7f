"""The fleet of the rollout benchmark, in its own process: `python -m bench.rolloutfleet SPEC.json`.

Workflow: reads the spec the benchmark wrote (work folder, trust folder, broker URL or none for the embedded
broker, the devices' CSV and group; the admin token and the fleet's broker password come in the environment as
SLMOPS_BENCH_ADMIN_TOKEN / SLMOPS_BENCH_BROKER_PASSWORD, never on the command line); starts
`slmops.story.FleetServer` (authentication on, as in production); writes every device into the fleet's database
in one transaction (`provision`: the device row with its group and the sha256 of its broker password, which is
how enrolment stores it and what the embedded broker checks); prints one JSON line with the fleet's URL and broker
URL; then runs until its stdin closes or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from devsim.accounts import from_csv


def provision(database_url: str, csv_path: Path, group: str) -> int:
    """Every device of the CSV into the fleet's database with its group and broker secret hash (one transaction)."""
    from sqlalchemy import insert

    from fleet.auth import hash_secret
    from fleet.db import open_database
    from fleet.models import Device, DeviceGroup

    accounts = from_csv(csv_path)
    now = datetime.now(timezone.utc)
    db = open_database(database_url)
    try:
        with db.sessions() as s, s.begin():
            s.execute(insert(Device), [
                {"id": a.device_id, "registered_at": now, "online": False, "agent_version": "",
                 "broker_secret_hash": hash_secret(a.password) if a.password else None} for a in accounts])
            s.execute(insert(DeviceGroup), [{"device_id": a.device_id, "group": group} for a in accounts])
    finally:
        db.close()
    return len(accounts)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from slmops.story import FleetServer

    fleet = FleetServer(Path(spec["workdir"]), broker_url=spec.get("broker_url"), trust_dir=Path(spec["trust_dir"]),
                        admin_token=os.environ["SLMOPS_BENCH_ADMIN_TOKEN"],
                        broker_password=os.environ["SLMOPS_BENCH_BROKER_PASSWORD"]).start(timeout=60)
    n = provision(fleet.settings.database_url, Path(spec["csv"]), spec["group"])
    print(json.dumps({"url": fleet.url, "broker_url": fleet.broker_url, "devices": n, "pid": os.getpid()}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    fleet.stop()


if __name__ == "__main__":
    main()
