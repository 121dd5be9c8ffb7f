"""The mosquitto limits in deploy/ are the ones the rollout benchmark runs, and the same in every shipped file."""

from __future__ import annotations

import re

from bench import mqttbroker

FILES = ["slmops.conf", "dynsec.conf", "passwd-acl.conf"]
BLOCK = re.compile(r"# --- limits:.*?# --- end limits ---\n", re.S)


def settings(text: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_every_shipped_config_has_the_same_limits() -> None:
    blocks = {f: BLOCK.findall((mqttbroker.DEPLOY / f).read_text()) for f in FILES}
    assert all(len(b) == 1 for b in blocks.values()), blocks.keys()
    assert len({b[0] for b in blocks.values()}) == 1
    limits = settings(blocks[FILES[0]][0])
    assert int(limits["max_queued_messages"]) >= 100_000  # the default 1000 dropped the fleet's reports
    assert int(limits["max_inflight_messages"]) >= 100
    assert int(limits["max_packet_size"]) > 64 * 1024  # protocol.messages.MAX_MESSAGE_BYTES fits


def test_the_benchmark_runs_the_shipped_settings(tmp_path) -> None:
    shipped = settings((mqttbroker.DEPLOY / "passwd-acl.conf").read_text())
    ran = settings(mqttbroker.conf_text(1883, tmp_path / "p", tmp_path / "a"))
    changed = {k for k in shipped if shipped[k] != ran.get(k)}
    assert changed == {"listener", "password_file", "acl_file", "persistence"}
