"""The agent stays light: neither importing it nor starting it loads torch or transformers."""

import os
import re
import subprocess
import sys
import time

import httpx

from tests.net import device_password, embedded_broker, free_port
from tests.trustkit import ORIGIN, TrustKit

HEAVY = ("torch", "transformers", "peft", "olive", "sqlalchemy", "amqtt")


def test_importing_every_agent_module_loads_nothing_heavy():
    code = (
        "import importlib, pkgutil, sys, agent\n"
        "for m in pkgutil.walk_packages(agent.__path__, 'agent.'): importlib.import_module(m.name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "none"


def test_starting_the_agent_loads_nothing_heavy(tmp_path):
    root = TrustKit().write_root(tmp_path / "root.json")
    port = free_port()
    with embedded_broker() as broker:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "slmops.cli", "agent", "run", "--device-id", "light-1",
             "--data-dir", str(tmp_path / "d"), "--broker", broker.url, "--trust-root", str(root),
             "--bundle-origin", ORIGIN, "--api-port", str(port), "--broker-username", "light-1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "SLMOPS_AGENT_BROKER_PASSWORD": device_password("light-1")},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, "agent exited early"
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "agent did not start"
                    time.sleep(0.2)
            assert health.status_code == 503 and health.json()["status"] == "no_model"
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    imported = set(re.findall(r"\|\s+([\w.]+)\s*$", err, re.M))
    assert "onnxruntime_genai" in imported and "paho.mqtt.client" in imported  # the trace is real
    assert not [m for m in imported if m.split(".")[0] in HEAVY]
    assert proc.returncode in (0, -15)


def test_local_api_serves_while_the_broker_is_unreachable(tmp_path):
    """Private inference must not depend on the fleet: with no broker the agent still starts and keeps trying."""
    from agent.config import AgentConfig
    from agent.service import Agent

    root = TrustKit().write_root(tmp_path / "root.json")
    agent = Agent(AgentConfig(device_id="lonely-1", data_dir=tmp_path / "d", broker_url=f"mqtt://127.0.0.1:{free_port()}",
                              trust_root=root, bundle_origins=(ORIGIN,), api_port=0, telemetry_interval_s=3600))
    agent.start()
    try:
        assert not agent.link.wait_connected(1.0)
        assert httpx.get(f"{agent.api_url}/health", timeout=5).json()["status"] == "no_model"
    finally:
        agent.stop()
