"""Fuzzing the agent's command gate: its stored state files, and whether a refused command changes any of them.

Parsers (`PARSERS`, run long by `bench/fuzz.py`):
    agent_state  `CommandGate(...)` starting over fuzzed state/commands.json, state/commands.2.json and
                 state/root.json (each missing, valid, mutated or raw bytes). Nothing may come out: a damaged seq
                 copy gives way to the other copy (0 when neither holds one), a damaged root.json to the
                 provisioned root. Checked against that documented rule: `last_seq` is the higher valid copy, the
                 root is root.json's when it loads, else the provisioned one.
    gate_admit   `CommandGate.admit(cmd)` of the real gate (TrustKit keys, one state folder per process) with
                 commands built from a plan: deploy or cancel; signed by the command key, another key or none;
                 seq above, at, below the last one or a recent one; bundle URL on the origin or hostile;
                 root_version the current one, a newer one (the fetcher has none) or the lowest; then maybe
                 mutated as JSON or bytes and passed through `parse_message` as the link does. A refused command
                 leaves every file in the state folder byte-identical and `last_seq` and the recent seqs unchanged;
                 an admitted one verifies against the commands role, is above the last seq and is stored; a clean
                 plan (command key, next seq, on-origin URL, current root, no mutation) is admitted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import timezone
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.commands import CommandGate
from protocol.errors import MessageError, SignatureError, SlmopsError
from protocol.manifest import MAX_VERSION
from protocol.messages import BundleRef, CancelCommand, DeployCommand, encode, parse_message
from protocol.root import load_trusted_root
from protocol.trust import generate_keypair, sign_message, verify_message
from tests.fuzz.test_bodies import quiet, scratch
from tests.fuzz.test_parsers import (
    CI, TOKENS, bundle_names, byte_edits, counts, dumps, hexes, hostile, ids, mutated, root_files, versions, wire,
)
from tests.trustkit import ORIGIN, TrustKit

KIT = TrustKit()
OLD_COMMAND_KEY = KIT.command_key  # root v1's command key; root v2 names a new one
KIT.rotate(commands=True)
LOGGERS = ("slmops.agent.commands", "slmops.agent.store")


def _provisioned(version: int) -> Path:
    path = scratch("provisioned") / f"{version}.root.json"
    if not path.exists():
        KIT.write_root(path, version)
    return path


# ---- agent_state: the gate's start over damaged files --------------------------------------------------------------

seq_docs = st.fixed_dictionaries({"seq": counts}, optional={"recent": st.lists(counts, max_size=70)})
seq_files = st.none() | wire(seq_docs, ("seq", "recent")) | mutated(seq_docs, ("seq", "recent")).map(dumps)
kit_roots = st.sampled_from([KIT.roots[1], KIT.roots[2]])
root_jsons = st.none() | kit_roots | kit_roots.flatmap(byte_edits) | root_files


def _seq_in(data: bytes | None) -> int:
    """The documented rule: a copy counts when it is UTF-8 JSON {"seq": int in 0..MAX_VERSION, ...}."""
    try:
        doc = json.loads(data.decode("utf-8"))  # type: ignore[union-attr]
    except (AttributeError, ValueError, RecursionError):
        return 0
    seq = doc.get("seq") if isinstance(doc, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_VERSION else 0


def _root_in(data: bytes | None) -> bytes | None:
    try:
        return load_trusted_root(data).raw if data is not None else None
    except SlmopsError:
        return None


def check_agent_state(files: tuple[bytes | None, bytes | None, bytes | None]) -> None:
    state = scratch("agent_state")
    for name, data in zip(("commands.json", "commands.2.json", "root.json"), files):
        if data is None:
            (state / name).unlink(missing_ok=True)
        else:
            (state / name).write_bytes(data)
    with quiet(*LOGGERS):
        gate = CommandGate(state, provisioned=_provisioned(1), origins=(ORIGIN,), fetch=KIT.fetch)
    assert gate.last_seq == max(_seq_in(files[0]), _seq_in(files[1]))
    assert gate.root.raw == (_root_in(files[2]) or KIT.roots[1])


# ---- gate_admit: a refused command writes nothing -------------------------------------------------------------------

OTHER = generate_keypair()
SIGNERS = {"command": lambda: KIT.command_key, "old_command": lambda: OLD_COMMAND_KEY, "other": lambda: OTHER,
           "bundles": lambda: KIT.bundle_keys[0], "root": lambda: KIT.root_keys[0]}
GOOD_URL = f"{ORIGIN}/api/v1/bundles/triage/2/file"
plans = st.fixed_dictionaries({
    "kind": st.sampled_from(["deploy", "deploy", "cancel"]),
    "signer": st.sampled_from(["command", "command", "command", "old_command", "other", "bundles", "root", "none"]),
    "seq": st.tuples(st.sampled_from(["next", "next", "last", "recent", "below", "any"]), st.integers(1, 5), counts),
    "url": st.just(GOOD_URL) | st.sampled_from([
        f"{ORIGIN}/api/v1/devices", f"{ORIGIN}/api/v1/bundles/../x", "http://evil:8700/api/v1/bundles/a/1/file",
        f"{ORIGIN}/api/v1/bundles/a/1/file?x=1", "http://u@127.0.0.1:8700/api/v1/bundles/a/1/file",
        "http://127.0.0.1:99999/api/v1/bundles/a"]) | st.text(min_size=1, max_size=60) | st.sampled_from(TOKENS[1:]),
    "root": st.sampled_from(["current", "current", "newer", "first"]),
    "mutate": st.sampled_from(["none", "none", "json", "bytes"]),
    "ids": st.tuples(ids, ids, ids), "bundle": st.tuples(bundle_names, versions, hexes, versions),
})


class _Gate:
    """One gate per process over one state folder, renewed when its seq nears the top (no seq could follow)."""

    gate: CommandGate | None = None

    @classmethod
    def get(cls) -> CommandGate:
        if cls.gate is None or cls.gate.last_seq > MAX_VERSION - 10:
            state = scratch("gate_admit")
            shutil.rmtree(state)
            with quiet(*LOGGERS):
                cls.gate = CommandGate(state, provisioned=_provisioned(2), origins=(ORIGIN,), fetch=KIT.fetch)
        return cls.gate


def _seq(plan: dict, gate: CommandGate) -> int:
    how, step, n = plan["seq"]
    recent = gate._recent
    return {"next": gate.last_seq + step, "last": gate.last_seq, "below": max(0, gate.last_seq - step),
            "recent": recent[-step] if len(recent) >= step else gate.last_seq, "any": n}[how]


def command(plan: dict, gate: CommandGate, ops: list | None = None) -> Any:
    """The command a plan describes, as the link would hand it over (None when parse_message refuses it)."""
    message_id, deployment_id, device_id = plan["ids"]
    root_version = {"current": gate.root.version, "newer": KIT.version + 1, "first": 1}[plan["root"]]
    common = dict(message_id=message_id, deployment_id=deployment_id, device_id=device_id, seq=_seq(plan, gate),
                  sent_at=KIT.expires.astimezone(timezone.utc), root_version=root_version)
    try:
        if plan["kind"] == "deploy":
            name, version, sha, size = plan["bundle"]
            cmd = DeployCommand(**common, bundle=BundleRef(name=name, version=version, url=plan["url"], sha256=sha,
                                                           size=size))
        else:
            cmd = CancelCommand(**common)
    except ValueError:  # pydantic's ValidationError: a URL the message itself refuses
        return None
    if plan["signer"] != "none":
        cmd = sign_message(cmd, [SIGNERS[plan["signer"]]()])
    data = encode(cmd)
    if ops is not None:
        data = (apply_json if plan["mutate"] == "json" else apply_bytes)(data, ops)
    try:
        return parse_message(data)
    except MessageError:
        return None


def _files(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in state.iterdir()}


def check_admit(x: tuple[dict, list | None]) -> None:
    plan, ops = x
    gate = _Gate.get()
    cmd = command(plan, gate, ops)
    if cmd is None or not isinstance(cmd, (DeployCommand, CancelCommand)):
        return
    before, seq, recent = _files(gate.state_dir), gate.last_seq, list(gate._recent)
    with quiet(*LOGGERS):
        admitted = gate.admit(cmd)
    if not admitted:
        after = _files(gate.state_dir)
        assert after == before, f"a refused command changed {sorted(k for k in {*after, *before} if after.get(k) != before.get(k))}"
        assert (gate.last_seq, gate._recent) == (seq, recent), "a refused command moved the last seq"
        clean = (plan["signer"] == "command" and plan["seq"][0] == "next" and plan["url"] == GOOD_URL
                 and plan["root"] == "current" and ops is None and seq + plan["seq"][1] <= MAX_VERSION)
        assert not clean, f"a clean command was refused: {cmd!r:.300}"
        return
    try:
        verify_message(cmd, gate.root.keyring("commands"))
    except SignatureError as exc:
        raise AssertionError(f"admitted a command the commands role did not sign: {exc}") from exc
    assert cmd.seq > seq and cmd.seq not in recent and gate.last_seq == cmd.seq
    for name in ("commands.json", "commands.2.json"):
        assert json.loads((gate.state_dir / name).read_bytes())["seq"] == cmd.seq


EDIT_FIELDS = ("seq", "root_version", "signatures", "keyid", "sig", "url", "bundle", "kind", "device_id", "size")
SPECIAL = [0, -1, 2**63, MAX_VERSION + 1, "", None, [], {}, True, 1.5, f"{ORIGIN}/api/v1/bundles/triage/3/file",
           [{"keyid": KIT.command_key.keyid, "sig": "00" * 64}]]
# edits are drawn as data and applied in the check, where the command's bytes are known (its seq follows the gate)
json_edits = st.lists(st.tuples(st.booleans(), st.sampled_from(EDIT_FIELDS) | st.text(max_size=6),
                                st.none() | st.sampled_from(SPECIAL) | hostile(True)), min_size=1, max_size=2)
byte_ops = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.floats(0, 1),
                              st.binary(min_size=1, max_size=40)), min_size=1, max_size=3)


def apply_json(data: bytes, ops: list[tuple[bool, str, Any]]) -> bytes:
    """Each op sets (or, with None, deletes) a key of the command or of its bundle."""
    doc = json.loads(data)
    for in_bundle, key, value in ops:
        target = doc["bundle"] if in_bundle and isinstance(doc.get("bundle"), dict) else doc
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return dumps(doc)


def apply_bytes(data: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    b = bytearray(data)
    for op, where, chunk in ops:
        pos = int(where * len(b))
        if op == "flip" and pos < len(b):
            b[pos] ^= chunk[0] or 1
        elif op == "cut":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = chunk
        elif op == "delete":
            del b[pos:pos + len(chunk)]
    return bytes(b)


admit_inputs = plans.flatmap(lambda plan: st.tuples(st.just(plan), {
    "none": st.none(), "json": json_edits, "bytes": byte_ops}[plan["mutate"]]))

PARSERS: dict[str, tuple[st.SearchStrategy, Callable[[Any], None]]] = {
    "agent_state": (st.tuples(seq_files, seq_files, root_jsons), check_agent_state),
    "gate_admit": (admit_inputs, check_admit),
}

# ---- the short run (make test) ------------------------------------------------------------------------------------


@CI
@given(PARSERS["agent_state"][0])
def test_gate_start_over_damaged_state_falls_back_as_documented(files: tuple) -> None:
    check_agent_state(files)


@CI
@given(PARSERS["gate_admit"][0])
def test_a_refused_command_leaves_the_gate_state_byte_identical(x: tuple) -> None:
    check_admit(x)
