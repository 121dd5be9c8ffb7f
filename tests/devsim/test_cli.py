"""`slmops sim` as a user runs it: a real mosquitto (anonymous, tests.net), three devices, a summary file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.net import MOSQUITTO, mosquitto
from tests.trustkit import TrustKit


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_sim_connects_every_device_and_writes_its_summary(tmp_path: Path) -> None:
    root = TrustKit().write_root(tmp_path / "root.json")
    summary = tmp_path / "summary.json"
    with mosquitto(tmp_path) as port:
        done = subprocess.run(
            [sys.executable, "-m", "slmops.cli", "sim", "--broker", f"mqtt5://127.0.0.1:{port}", "--trust-root",
             str(root), "--devices", "3", "--duration", "3", "--telemetry-s", "0.5", "--summary", str(summary),
             "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(summary.read_text())
    assert (doc["devices"], doc["connects"], doc["refused"], doc["loop_errors"]) == (3, 3, 0, 0)
    assert doc["telemetry"] >= 6 and doc["acked"] >= doc["telemetry"] + 3  # telemetry and presence acknowledged
    assert "all connected after" in done.stderr


def test_sim_refuses_a_bad_trust_root(tmp_path: Path) -> None:
    bad = tmp_path / "root.json"
    bad.write_text("{}")
    done = subprocess.run([sys.executable, "-m", "slmops.cli", "sim", "--broker", "mqtt://127.0.0.1:1", "--trust-root",
                           str(bad), "--devices", "1", "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "trust root is not usable" in done.stderr
