"""Rollout benchmark: `python -m bench.rollout --devices 10000 [--broker mosquitto|embedded]`.

Workflow, each part a real process on loopback:
1. a trust folder (`fleet.trust.init_trust`) and a small signed bundle (random bytes for weights: nothing is
   downloaded, the simulator only reports);
2. device accounts: ids `bench-00000...`, a random password each (secrets.token_urlsafe), in a 0600 CSV;
3. the broker: mosquitto from `deploy/mosquitto/passwd-acl.conf` with its limits unchanged and a password file
   written directly (bench.mqttbroker; 10,000 accounts in seconds), or the fleet's embedded amqtt broker;
4. the fleet (`bench.rolloutfleet`, auth on), which writes every device into its database with its group and broker
   secret hash, and the simulator (`slmops sim`, its own process); the bench waits until every device connected;
5. the rollout starts (`start_rollout`: today POST /api/v1/deployments to the group) and the bench reads the fleet's
   SQLite database (read-only, so polling costs the fleet nothing) until every target holds a terminal state and
   every report the simulator sent is stored, or `--timeout` passes;
6. results: devices per minute from the rollout's start to the last target's terminal state stored, reports sent
   (simulator) against stored (database) = lost, CPU seconds and peak RSS of the fleet, the broker and the
   simulator (psutil, sampled every 0.5 s) until the last device finished, and the simulator's own counts (its
   summary, written when it stops: reports published, broker acknowledgements, reconnects), in `bench/results/rollout-<broker>-<n>-<time>.json` and `.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import psutil

from . import mqttbroker

RESULTS = Path(__file__).resolve().parent / "results"
TERMINAL = ("active", "rolled_back", "failed", "rejected")
GROUP = "bench"


def start_rollout(http: httpx.Client, name: str, version: int, group: str, *, canary: int = 0,
                  waves: tuple[float, ...] = (100.0,)) -> str:
    """Start a rollout to `group` (POST /api/v1/rollouts): an optional canary of `canary` devices, then `waves`
    (cumulative percents), every device allowed to update at once; the rollout id, which is also the deployment id
    whose targets the bench follows."""
    body = {"bundle": {"name": name, "version": version}, "target": {"group": group},
            "strategy": {"canary": {"count": canary} if canary else None, "waves": [{"percent": w} for w in waves],
                         "success_threshold": 0.9, "error_threshold": 0.2, "max_parallel": 1_000_000},
            "gate": {"no_regression": False}}
    r = http.post("/api/v1/rollouts", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["id"]


def make_bundle(work: Path, trust: Path) -> Path:
    from fleet.bundles import build_bundle
    from protocol.trust import PrivateKey

    model = work / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(os.urandom(4096))
    (model / "genai_config.json").write_text('{"model": {"type": "bench"}}')
    (model / "eval.json").write_text('{"dataset": "bench", "metrics": {"accuracy": 0.9}, "smoke": []}')
    key = PrivateKey.from_pem(next(trust.glob("bundles-*.key")).read_bytes())
    now = datetime.now(timezone.utc)
    out = work / "bench-1.bundle"
    build_bundle(model, out, name="bench", version=1, signers=[key], now=now, expires=now + timedelta(days=7))
    return out


class Meter:
    """CPU seconds and peak RSS of some processes (children included), sampled."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = {k: psutil.Process(pid) for k, pid in procs.items()}
        self.peak = dict.fromkeys(procs, 0)
        self.cpu0 = {k: self._cpu(p) for k, p in self.procs.items()}
        self.samples: list[dict] = []

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def sample(self, t: float, **extra: float) -> None:
        row = {"t": t, **extra}
        for k, p in self.procs.items():
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                rss = 0
            self.peak[k] = max(self.peak[k], rss)
            row[f"{k}_cpu_s"] = self._cpu(p) - self.cpu0[k]
        self.samples.append(row)

    def totals(self) -> dict:
        return {k: {"cpu_s": round(self._cpu(p) - self.cpu0[k], 2), "peak_rss_mib": round(self.peak[k] / 2**20, 1)}
                for k, p in self.procs.items()}


def db_counts(db: Path, deployment_id: str) -> tuple[dict[str, int], int, str | None]:
    """(targets by state, status reports stored, latest updated_at of a terminal target) from the fleet's DB."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        states = dict(con.execute("SELECT state, count(*) FROM deployment_targets WHERE deployment_id = ? "
                                  "GROUP BY state", (deployment_id,)).fetchall())
        stored = con.execute("SELECT count(*) FROM status_reports WHERE deployment_id = ?",
                             (deployment_id,)).fetchone()[0]
        marks = ",".join("?" * len(TERMINAL))
        last = con.execute(f"SELECT max(updated_at) FROM deployment_targets WHERE deployment_id = ? AND state IN "
                           f"({marks})", (deployment_id, *TERMINAL)).fetchone()[0]
    finally:
        con.close()
    return states, stored, last


def epoch(stamp: str) -> float:
    t = datetime.fromisoformat(stamp)
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def run(args: argparse.Namespace) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # every child (mosquitto too) inherits it
    from fleet.trust import init_trust

    work = Path(tempfile.mkdtemp(prefix="slmops-rollout-"))
    procs: list[subprocess.Popen] = []
    broker = None
    try:
        trust = work / "trust"
        init_trust(trust, now=datetime.now(timezone.utc))
        bundle = make_bundle(work, trust)
        ids = [f"bench-{i:05d}" for i in range(args.devices)]
        passwords = {d: secrets.token_urlsafe(24) for d in ids}
        csv = work / "devices.csv"
        mqttbroker.write_private(csv, "device_id,username,password\n" + "".join(f"{d},{d},{p}\n" for d, p in passwords.items()))
        admin, fleet_pw = "slm_" + secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        t = time.monotonic()
        if args.broker == "mosquitto":
            broker = mqttbroker.Mosquitto(work / "mosquitto", passwords, fleet_pw).start()
            broker_url: str | None = broker.url
        else:
            broker_url = None
        spec = work / "fleet.json"
        spec.write_text(json.dumps({"workdir": str(work / "fleet"), "trust_dir": str(trust), "broker_url": broker_url,
                                    "csv": str(csv), "group": GROUP}))
        env = {**os.environ, "SLMOPS_BENCH_ADMIN_TOKEN": admin, "SLMOPS_BENCH_BROKER_PASSWORD": fleet_pw}
        fleet_log = (work / "fleet.log").open("wb")
        fleet = subprocess.Popen([sys.executable, "-m", "bench.rolloutfleet", str(spec)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=fleet_log, env=env)
        procs.append(fleet)
        line = fleet.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the fleet did not start; see {work / 'fleet.log'}")
        info = json.loads(line)
        provision_s = time.monotonic() - t
        print(f"fleet at {info['url']}, broker {info['broker_url']}, {info['devices']} devices provisioned "
              f"in {provision_s:.1f} s", flush=True)
        http = httpx.Client(base_url=info["url"], headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        with bundle.open("rb") as f:
            http.post("/api/v1/bundles", content=f, headers={"content-type": "application/octet-stream"}).raise_for_status()
        status_file, summary = work / "sim-status.json", work / "sim-summary.json"
        sim_cmd = [sys.executable, "-m", "slmops.cli", "sim", "--broker", info["broker_url"], "--trust-root",
                   str(trust / "root.json"), "--credentials", str(csv), "--bundle-origin", info["url"],
                   "--status-file", str(status_file), "--summary", str(summary), "--quiet",
                   "--download-s", str(args.step_s), "--verify-s", str(args.step_s), "--install-s", str(args.step_s),
                   "--health-s", str(args.step_s)]
        sim = subprocess.Popen(sim_cmd, stdout=subprocess.DEVNULL, stderr=(work / "sim.log").open("wb"))
        procs.append(sim)
        t = time.monotonic()
        while True:
            st = json.loads(status_file.read_text()) if status_file.exists() else {"connected": 0}
            if st["connected"] >= args.devices:
                break
            if sim.poll() is not None or time.monotonic() - t > args.timeout:
                raise RuntimeError(f"{st['connected']} of {args.devices} devices connected; see {work / 'sim.log'}")
            time.sleep(0.5)
        connect_s = time.monotonic() - t
        print(f"{args.devices} devices connected in {connect_s:.1f} s", flush=True)
        time.sleep(args.settle_s)  # the fleet stores the online presences before the rollout starts
        pids = {"fleet": fleet.pid, "simulator": sim.pid}
        if broker is not None and broker.proc is not None:
            pids["broker"] = broker.proc.pid
        meter = Meter(pids)
        db = work / "fleet" / "fleet.db"
        t0_wall = time.time()
        t0 = time.monotonic()
        dep = start_rollout(http, "bench", 1, GROUP, canary=args.canary,
                            waves=tuple(float(w) for w in args.waves.split(",")))
        post_s = time.monotonic() - t0
        print(f"rollout {dep} started; the request took {post_s:.1f} s", flush=True)
        states, stored, last = {}, 0, None
        sent = 0
        while time.monotonic() - t0 < args.timeout:
            time.sleep(0.5)
            states, stored, last = db_counts(db, dep)
            st = json.loads(status_file.read_text())
            sent = st["reports"]
            finished = sum(states.get(s, 0) for s in TERMINAL)
            meter.sample(time.monotonic() - t0, finished=finished, stored=stored, sent=sent)
            if finished >= args.devices and stored >= sent:
                break
        totals = meter.totals()
        acked, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 3.0 and time.monotonic() - t0 < args.timeout + 60:
            now_acked = json.loads(status_file.read_text())["acked"]  # publishes still waiting for the broker
            if now_acked != acked:
                acked, quiet_since = now_acked, time.monotonic()
            time.sleep(0.5)
        sim.send_signal(signal.SIGTERM)  # the simulator's final counts: its summary, written as it stops
        sim.wait(timeout=120)
        sim_summary = json.loads(summary.read_text())
        sent = sim_summary["reports"]
        stored = -1
        while True:  # anything still in flight lands now, or is lost
            states, now_stored, last = db_counts(db, dep)
            if now_stored == stored:
                break
            stored = now_stored
            time.sleep(2.0)
        finished = sum(states.get(s, 0) for s in TERMINAL)
        span = (epoch(last) - t0_wall) if last else None
        result = {
            "broker": args.broker, "devices": args.devices, "step_s": args.step_s, "started_at": t0_wall,
            "provision_s": round(provision_s, 2), "connect_s": round(connect_s, 2), "post_s": round(post_s, 2),
            "rollout_s": round(span, 2) if span else None,
            "devices_per_minute": round(finished / span * 60) if span else 0,
            "finished": finished, "targets": states, "reports_sent": sent, "reports_stored": stored,
            "reports_lost": sent - stored, "processes": totals, "simulator": sim_summary, "timeline": meter.samples,
            "host": {"cpus": os.cpu_count(), "note": "measured on a shared, busy box unless said otherwise"},
        }
        return result
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if broker is not None:
            broker.stop()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    tl = result["timeline"]
    t = [r["t"] for r in tl]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(t, [r["finished"] for r in tl], label="devices finished (stored)")
    a.plot(t, [r["sent"] for r in tl], label="reports sent")
    a.plot(t, [r["stored"] for r in tl], label="reports stored")
    a.set_ylabel("count")
    a.legend()
    a.set_title(f"rollout to {result['devices']} devices on {result['broker']}: "
                f"{result['devices_per_minute']} devices/min, {result['reports_lost']} reports lost")
    for k in result["processes"]:
        cpu = [r[f"{k}_cpu_s"] for r in tl]
        rate = [0.0] + [(cpu[i] - cpu[i - 1]) / max(t[i] - t[i - 1], 1e-3) * 100 for i in range(1, len(t))]
        b.plot(t, rate, label=f"{k} CPU %")
    b.set_xlabel("seconds since the rollout started")
    b.set_ylabel("CPU % (100 = one core)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    ap.add_argument("--step-s", type=float, default=0.0, help="simulated seconds per update step")
    ap.add_argument("--canary", type=int, default=0, help="devices in a canary wave first (0: none)")
    ap.add_argument("--waves", default="100", help="cumulative percents of the waves after the canary, e.g. 10,100")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for connects, and for the rollout")
    ap.add_argument("--settle-s", type=float, default=5.0, help="seconds between the last connect and the rollout")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, database)")
    args = ap.parse_args(argv)
    if args.broker == "mosquitto" and mqttbroker.missing():
        sys.exit(f"bench.rollout: {mqttbroker.missing()}; or run with --broker embedded")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"rollout-{args.broker}-{args.devices}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plotted = plot(result, args.out / f"{stem}.png")
    p = result["processes"]
    print(f"{result['devices']} devices on {result['broker']}: {result['finished']} finished in "
          f"{result['rollout_s']} s = {result['devices_per_minute']} devices/min; reports sent "
          f"{result['reports_sent']}, stored {result['reports_stored']}, lost {result['reports_lost']}")
    for k, v in p.items():
        print(f"  {k:<10} CPU {v['cpu_s']:>7.1f} s   peak RSS {v['peak_rss_mib']:>7.1f} MiB")
    print(f"written: {args.out / (stem + '.json')}" + (f" and {stem}.png" if plotted else ""))


if __name__ == "__main__":
    main()
