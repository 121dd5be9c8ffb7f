"""The reference task: IoT device log triage, and the seeded generator of its shipped splits.

Workflow: `generate(seed)` draws log lines from device families (pumps, gateways, batteries, disks, firmware,
freezers, HVAC, meters, motors, inverters, edge boxes, sensors, certificates, valves); each family knows the
thresholds that make a reading ok, a warning or a fault and the action that goes with it. Rows are deduplicated
by prompt and dealt into train/val/test, so the splits never share a prompt. `write_splits()` writes them as
JSONL under `trainer/data/`; `load_split()` reads them back. `write_unlabelled()` writes a pool of further log
lines without answers (another seed, none of them in a split): the prompts a teacher answers for a distilled
student. The same seed always gives the same bytes.

A row is `{"prompt": <log line>, "answer": "<label>: <action>", "label": <label>}`; the prompt is the whole
content of the user message.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DATASET = "slmops-triage-v1"
LABELS = ("ok", "warning", "fault")
ANSWER_RE = re.compile(r"^(ok|warning|fault): ")
SPLIT_SIZES = {"train": 3000, "val": 300, "test": 300}
LABEL_WEIGHTS = (0.4, 0.3, 0.3)
OK_ACTION = "no action needed"

Row = dict[str, str]
# A family draws (fields after the device id, label, action) for one label; `dev` is the device id.
Family = Callable[[random.Random, str, str], tuple[str, str]]

_EPOCH = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _u(rng: random.Random, lo: float, hi: float, nd: int = 1) -> float:
    return round(rng.uniform(lo, hi), nd)


def _pump(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    temp, vib, status = _u(rng, 40, 65), _u(rng, 0.1, 0.4), "RUNNING"
    action = OK_ACTION
    if label == "warning":
        if rng.random() < 0.5:
            temp, status, action = _u(rng, 72, 84), "HIGH_TEMP", f"check coolant flow on {dev}"
        else:
            vib, status, action = _u(rng, 0.5, 0.8), "VIBRATION", f"schedule a bearing check for {dev}"
    elif label == "fault":
        if rng.random() < 0.5:
            temp, status, action = _u(rng, 90, 115), "OVERHEAT", f"shut down {dev} and inspect cooling"
        else:
            vib, status, action = _u(rng, 1.0, 2.5), "VIBRATION_CRITICAL", f"stop {dev} and replace bearings"
    return f"temp={temp}C vibration={vib}g status={status}", action


def _gateway(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    uplink = rng.choice(["lte", "wifi", "ethernet"])
    rssi, loss, link, action = rng.randint(-75, -50), _u(rng, 0, 1), "up", OK_ACTION
    if label == "warning":
        if rng.random() < 0.5:
            rssi, action = rng.randint(-96, -86), f"check the antenna and signal on {dev}"
        else:
            loss, link, action = _u(rng, 3, 9), "flapping", f"monitor packet loss on {dev}"
    elif label == "fault":
        rssi, loss, link, action = rng.randint(-120, -100), 100.0, "down", f"restart {dev} and check the uplink"
    return f"uplink={uplink} rssi={rssi}dBm loss={loss}% link={link}", action


def _battery(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    pct = {"ok": rng.randint(45, 100), "warning": rng.randint(15, 35), "fault": rng.randint(0, 8)}[label]
    volts = round(3.0 + 1.2 * pct / 100 + rng.uniform(-0.03, 0.03), 2)
    action = {
        "ok": OK_ACTION,
        "warning": f"schedule a battery replacement for {dev}",
        "fault": f"replace the battery in {dev} now",
    }[label]
    return f"battery={pct}% voltage={volts}V", action


def _disk(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    used, inodes, fs, action = rng.randint(20, 75), rng.randint(5, 60), "rw", OK_ACTION
    if label == "warning":
        used, action = rng.randint(82, 94), f"clean up old logs on {dev}"
    elif label == "fault":
        if rng.random() < 0.5:
            used, action = rng.randint(97, 100), f"free disk space on {dev} and restart the agent"
        else:
            fs, action = "ro", f"remount the filesystem on {dev} and check the disk"
    return f"disk_used={used}% inodes={inodes}% fs={fs}", action


def _firmware(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    ver = f"{rng.randint(1, 4)}.{rng.randint(0, 9)}.{rng.randint(0, 20)}"
    if label == "ok":
        return f"fw={ver} update=success reboot=clean", OK_ACTION
    if label == "warning":
        return f"fw={ver} update=retrying attempt={rng.randint(1, 2)}/3", f"retry the firmware update on {dev}"
    reason = rng.choice(["checksum_mismatch", "signature_invalid", "boot_loop"])
    return f"fw={ver} update=failed reason={reason}", f"roll back the firmware on {dev}"


def _freezer(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    temp, door, action = _u(rng, -22, -16), "closed", OK_ACTION
    if label == "warning":
        if rng.random() < 0.5:
            temp, action = _u(rng, -14, -10), f"check the compressor on {dev}"
        else:
            door, action = f"open_{rng.randint(3, 15)}min", f"check the door seal on {dev}"
    elif label == "fault":
        temp, action = _u(rng, -4, 8), f"move stock out of {dev} and call service"
    return f"temp={temp}C setpoint=-18C door={door}", action


def _hvac(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    rpm, filt, airflow, action = rng.randint(1100, 1500), "clean", rng.randint(85, 100), OK_ACTION
    if label == "warning":
        filt, airflow, action = "dirty", rng.randint(60, 80), f"replace the air filter in {dev}"
    elif label == "fault":
        rpm, filt, airflow, action = 0, rng.choice(["dirty", "clogged"]), 0, f"stop {dev} and inspect the fan"
    return f"fan_rpm={rpm} filter={filt} airflow={airflow}%", action


def _meter(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    missed = {"ok": 0, "warning": rng.randint(1, 3), "fault": rng.randint(10, 60)}[label]
    last_seen = missed * 300 + rng.randint(1, 299)
    action = {
        "ok": OK_ACTION,
        "warning": f"check the connectivity of {dev}",
        "fault": f"send a technician to {dev}",
    }[label]
    return f"heartbeat_missed={missed} last_seen={last_seen}s", action


def _motor(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    amps = {"ok": _u(rng, 4, 9.5), "warning": _u(rng, 11, 13.5), "fault": _u(rng, 16, 30)}[label]
    rpm = rng.randint(1400, 1500) if label != "fault" else rng.randint(0, 600)
    action = {
        "ok": OK_ACTION,
        "warning": f"reduce the load on {dev}",
        "fault": f"cut power to {dev} and check the windings",
    }[label]
    return f"current={amps}A rated=10A rpm={rpm}", action


def _inverter(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    kw = _u(rng, 0.5, 9.9)
    if label == "ok":
        return f"output={kw}kW grid=ok error=none", OK_ACTION
    if label == "warning":
        return f"output={kw}kW grid=unstable error=none", f"monitor the grid voltage at {dev}"
    code = rng.choice(["E21", "E34", "E07"])
    return f"output=0.0kW grid=lost error={code}", f"isolate {dev} and reset the breaker"


def _edge(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    cpu, mem, oom, action = rng.randint(5, 70), rng.randint(20, 75), 0, OK_ACTION
    if label == "warning":
        mem, action = rng.randint(85, 94), f"restart the services on {dev}"
    elif label == "fault":
        mem, oom, action = rng.randint(98, 100), rng.randint(1, 9), f"reboot {dev} and look for a memory leak"
    return f"cpu={cpu}% mem={mem}% oom_kills={oom}", action


def _sensor(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    value, age, action = f"{_u(rng, 30, 70)}%", rng.randint(1, 60), OK_ACTION
    if label == "warning":
        age, action = rng.randint(300, 900), f"check the sampling interval of {dev}"
    elif label == "fault":
        value, age, action = "NaN", rng.randint(1, 60), f"replace the probe on {dev}"
    return f"humidity={value} reading_age={age}s", action


def _cert(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    days = {"ok": rng.randint(60, 365), "warning": rng.randint(3, 14), "fault": 0}[label]
    skew = rng.randint(0, 2)
    action = {
        "ok": OK_ACTION,
        "warning": f"renew the certificate on {dev}",
        "fault": f"replace the expired certificate on {dev}",
    }[label]
    return f"cert_expires_in={days}d clock_skew={skew}s", action


def _valve(rng: random.Random, label: str, dev: str) -> tuple[str, str]:
    pos = rng.randint(10, 90)
    bar = {"ok": _u(rng, 2, 5), "warning": _u(rng, 6.5, 8), "fault": _u(rng, 9.5, 14)}[label]
    action = {
        "ok": OK_ACTION,
        "warning": f"check the pressure regulator at {dev}",
        "fault": f"close {dev} and relieve the pressure",
    }[label]
    return f"position={pos}% pressure={bar}bar", action


FAMILIES: dict[str, tuple[str, Family]] = {
    "pump": ("pump", _pump),
    "gateway": ("gw", _gateway),
    "battery": ("bat", _battery),
    "disk": ("edge", _disk),
    "firmware": ("cam", _firmware),
    "freezer": ("freezer", _freezer),
    "hvac": ("hvac", _hvac),
    "meter": ("meter", _meter),
    "motor": ("motor", _motor),
    "inverter": ("inverter", _inverter),
    "edge": ("node", _edge),
    "sensor": ("sensor", _sensor),
    "cert": ("gw", _cert),
    "valve": ("valve", _valve),
}


def make_row(rng: random.Random) -> Row:
    """Draw one labelled log line."""
    label = rng.choices(LABELS, weights=LABEL_WEIGHTS)[0]
    prefix, family = FAMILIES[rng.choice(sorted(FAMILIES))]
    dev = f"{prefix}-{rng.randint(1, 120):02d}"
    fields, action = family(rng, label, dev)
    when = _EPOCH + timedelta(seconds=rng.randint(0, 60 * 86400))
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"prompt": f"{stamp} {dev} {fields}", "answer": f"{label}: {action}", "label": label}


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[Row]]:
    """Return disjoint splits (by prompt) of the given sizes, the same for the same seed."""
    sizes = sizes or SPLIT_SIZES
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Row]] = {name: [] for name in sizes}
    for name, size in sizes.items():
        while len(splits[name]) < size:
            row = make_row(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                splits[name].append(row)
    return splits


def write_splits(out_dir: Path = DATA_DIR, seed: int = 0) -> list[Path]:
    """Write `triage_<split>.jsonl` files for every split; return their paths."""
    paths = []
    for name, rows in generate(seed).items():
        path = out_dir / f"triage_{name}.jsonl"
        path.write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows), encoding="utf-8")
        paths.append(path)
    return paths


UNLABELLED_SIZE = 6000  # log lines without answers: what a teacher labels for a distilled student
UNLABELLED_SEED = 1


def unlabelled_prompts(seed: int = UNLABELLED_SEED, size: int = UNLABELLED_SIZE) -> list[str]:
    """Log lines drawn like the splits' (another seed), none of them a prompt of any shipped split."""
    taken = {row["prompt"] for rows in generate(0).values() for row in rows}
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < size:
        prompt = make_row(rng)["prompt"]
        if prompt not in taken:
            taken.add(prompt)
            prompts.append(prompt)
    return prompts


def write_unlabelled(out_dir: Path = DATA_DIR, seed: int = UNLABELLED_SEED) -> Path:
    """Write `triage_unlabelled.jsonl`: one `{"prompt": ...}` per line, no answer, no label."""
    path = out_dir / "triage_unlabelled.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}, separators=(",", ":")) + "\n" for p in unlabelled_prompts(seed)),
                    encoding="utf-8")
    return path


def load_split(split: str, data_dir: Path = DATA_DIR) -> list[Row]:
    """Read one shipped split ("train", "val" or "test")."""
    path = data_dir / f"triage_{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def label_of(answer: str) -> str | None:
    """The label an answer starts with, or None when it does not follow `<label>: <action>`."""
    match = ANSWER_RE.match(answer)
    return match.group(1) if match else None


if __name__ == "__main__":
    for written in [*write_splits(), write_unlabelled()]:
        print(written)
