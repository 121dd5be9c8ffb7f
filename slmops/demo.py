"""`slmops demo`: the whole story on one machine, printed as a report.

Build bundles v1 and v2 with `slmops train pipeline` (one recipe each: the tiny reference model trained briefly,
then longer; exported to onnxruntime-genai int4; evaluated; signed), and a deliberately broken v3 (v2 with damaged
weights), start the fleet with
its embedded MQTT broker and three agents, deploy v1 to group `demo`, then roll v2 out in stages behind a quality
gate (a canary first; each device scores the bundle's own held-out set in its health check and the next wave opens
only on those scores), show the gate refusing v1 again (a regression), and roll v3 out the same way: its canary
fails the health check and rolls back, the rollout aborts, and the other devices never see v3. Every agent is asked
a question through its local API after each step; v2 must still answer at the end.
Authentication is on throughout: a trust root signs bundles (2 of 3 keys) and commands, every agent enrols with a
one-time token for its own broker account and API token; at the end a set of attacks (`slmops.probes`) must each be
refused. The pipeline reuses finished steps in the work folder, so a second run skips training. Exit code 0 only if every check holds.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

app = typer.Typer(help="Run the whole story on this machine and print a report.")
console = Console()
NAME, GROUP = "triage", "demo"
GATE = 0.5  # label accuracy every device must measure on the bundle's own held-out set for a wave to count


@dataclass
class Built:
    version: int
    folder: Path
    note: str
    metrics: dict[str, float] = field(default_factory=dict)
    bundle: Path | None = None


@dataclass
class Rollout:
    version: int
    targets: dict[str, dict]
    answers: dict[str, tuple[str, str]]
    seconds: float
    staged: dict | None = None  # the rollout record (waves, state, reason) of a staged rollout


def _recipe(work: Path, version: int, steps: int, keys: list[Path], created: datetime) -> Path:
    """The pipeline recipe of one demo version: the tiny model trained `steps` steps, int4, evaluated, signed."""
    path = work / "recipes" / f"{NAME}-v{version}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    key_list = ", ".join(f'"{k}"' for k in keys)
    path.write_text(f"""# slmops train pipeline {path.name}: what `slmops demo` builds v{version} with
work_dir = "{work / 'models'}"

[base]
tiny = {{steps = {steps}, seed = 0}}

[export]
precision = "int4"

[bundle]
name = "{NAME}"
version = {version}
out = "{work / 'bundles' / f'{NAME}-v{version}.bundle'}"
keys = [{key_list}]
created = {created.strftime('%Y-%m-%dT%H:%M:%SZ')}
expires_days = 30
base_model = "slmops tiny Qwen2 (reference)"
description = "{steps} training steps"
""", encoding="utf-8")
    return path


def _build_models(work: Path, steps_v1: int, steps_v2: int, fresh: bool) -> tuple[Path, list[str], list[Built]]:
    """`slmops keys init --bundle-keys 3 --bundle-threshold 2` into work/keys, then `slmops train pipeline` for v1
    and v2 (every bundle signed by 2 of the 3 bundle keys, what the devices' trust root asks for), then v3: v2's
    folder with its weights damaged after the evaluation, packed and signed the same way."""
    from fleet.bundles import build_bundle
    from fleet.trust import init_trust
    from protocol.trust import PrivateKey
    from slmops.pipeline import run_file
    from slmops.story import damaged_copy

    keys = work / "keys"
    now = datetime.now(timezone.utc).replace(microsecond=0)
    init_trust(keys, now=now, bundle_keys=3, bundle_threshold=2, expires_in_days=30)
    signing = sorted(keys.glob("bundles-*.key"))[:2]
    if fresh:
        shutil.rmtree(work / "models", ignore_errors=True)
    built = []
    for version, steps in ((1, steps_v1), (2, steps_v2)):
        console.print(f"  [bold]slmops train pipeline[/] recipes/{NAME}-v{version}.toml: tiny Qwen2, {steps} steps")
        result = run_file(_recipe(work, version, steps, signing, now), progress=True,
                          log=lambda line: console.print(f"    {line}"))
        built.append(Built(version, result.steps[-1].output, f"{steps} training steps", result.metrics, result.bundle))
    broken = damaged_copy(built[1].folder, work / "models" / "v3-int4-damaged")
    v3 = Built(3, broken, "v2 with weights damaged after its evaluation", built[1].metrics,
               work / "bundles" / f"{NAME}-v3.bundle")
    signers = [PrivateKey.from_pem(p.read_bytes()) for p in signing]
    build_bundle(v3.folder, v3.bundle, name=NAME, version=3, signers=signers, now=now,
                 base_model="slmops tiny Qwen2 (reference)", expires=now + timedelta(days=30), description=v3.note)
    built.append(v3)
    return keys, [k.keyid for k in signers], built


STYLE = {"active": ("green", "✓ active"), "rolled_back": ("yellow", "↩ rolled back"), "rejected": ("red", "✗ rejected"),
         "cancelled": ("cyan", "– never sent: the rollout stopped first")}


def _outcome(state: str) -> str:
    color, text = STYLE.get(state, ("red", f"✗ {state}"))
    return f"[{color}]{text}[/]"


def _print_rollout(r: Rollout) -> None:
    if r.staged is not None:
        _print_waves(r.staged)
    t = Table(title=f"{NAME} v{r.version} to group '{GROUP}': settled in {r.seconds:.1f}s", title_justify="left")
    for col in ("device", "result", "serving now", "answer from its local API"):
        t.add_column(col)
    for dev, tgt in sorted(r.targets.items()):
        model, answer = r.answers.get(dev, ("-", "-"))
        t.add_row(dev, _outcome(tgt["state"]), model, answer)
    console.print(t)
    reasons = sorted({tgt["detail"] for tgt in r.targets.values() if tgt.get("detail") and tgt["state"] != "cancelled"})
    for reason in reasons:
        who = sorted(d for d, tgt in r.targets.items() if tgt.get("detail") == reason)
        console.print(f"  reason reported by {', '.join(who)}: [italic]{reason}[/]")


def _print_waves(staged: dict) -> None:
    gate = ", ".join(f"{k} >= {v:g}" for k, v in (staged["gate"].get("min") or {}).items()) or "none"
    t = Table(title=f"rollout {staged['id'][:8]}: {staged['state'].upper()}, {staged['reason']} (gate: {gate})",
              title_justify="left")
    for col in ("wave", "state", "devices", "updated", "failed", "never sent", "score measured on the devices"):
        t.add_column(col)
    for w in staged["waves"]:
        c, s = w["counts"], w.get("score")
        score = f"{s['mean']:.2f} (min {s['min']:.2f}, n={s['n']})" if s else "-"
        t.add_row(w["name"], w["state"], str(w["size"]), str(c["succeeded"]), str(c["failed"] + c["rolled_back"]),
                  str(c["cancelled"]), score)
    console.print(t)


def _staged(version: int, gate: float) -> dict:
    """A canary of one device, then everyone; any failure aborts; the gate on the devices' own scores."""
    return {"bundle": {"name": NAME, "version": version}, "target": {"group": GROUP},
            "strategy": {"canary": {"count": 1}, "waves": [{"percent": 100}], "success_threshold": 1.0,
                         "error_threshold": 0.0, "device_timeout_s": 300},
            "gate": {"min": {"label_accuracy": gate}, "no_regression": True}}


@app.callback(invoke_without_command=True)
def demo(
    workdir: Path = typer.Option(Path("demo-out"), help="Work folder: models, keys, bundles, fleet data, agent data, logs."),
    agents: int = typer.Option(3, min=1, max=20, help="How many agents (devices) to start."),
    broker: str | None = typer.Option(None, help="External broker URL (mqtt:// or mqtt5://); default: the fleet's embedded one."),
    steps_v1: int = typer.Option(150, help="Training steps for v1."),
    steps_v2: int = typer.Option(600, help="Training steps for v2."),
    fresh: bool = typer.Option(False, help="Retrain the models even if the work folder has them."),
) -> None:
    """Run the whole story on this machine and print a report."""
    from slmops.story import QUESTION, AgentProcess, FleetClient, FleetServer, ask, rollout, staged_rollout

    started = time.monotonic()
    work = workdir.resolve()
    for sub in ("fleet", "agents", "logs", "bundles", "keys", "recipes"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    logging.basicConfig(filename=work / "logs" / "fleet.log", level=logging.INFO,  # the fleet's log, off the report
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console.print(Panel.fit("[bold]slmops demo[/]: tiny model -> signed int4 bundle -> MQTT rollout -> "
                            "agents verify, serve, report, roll back", border_style="cyan"))

    console.rule("[bold]1. Build, export to int4, evaluate and sign: one pipeline recipe per version")
    trust, keyids, built = _build_models(work, steps_v1, steps_v2, fresh)
    t = Table(title="models, scored on the held-out test split of the triage task (v3 carries v2's scores)",
              title_justify="left")
    for col in ("version", "what", "label accuracy", "format ok", "exact match", "tokens/s"):
        t.add_column(col)
    for b in built:
        m = b.metrics
        t.add_row(f"v{b.version}", b.note, f"{m.get('label_accuracy', 0):.1%}", f"{m.get('format_rate', 0):.1%}",
                  f"{m.get('exact_match', 0):.1%}", f"{m.get('tokens_per_s', 0):.0f}")
    console.print(t)

    console.rule("[bold]2. Signed bundles")
    console.print(f"  trust root {trust / 'root.json'}: bundles need 2 of 3 keys; commands signed by the fleet's key")
    for b in built:
        console.print(f"  {b.bundle.name}: {b.bundle.stat().st_size / 1e6:.2f} MB, Ed25519 keys "
                      f"{', '.join(k[:16] for k in keyids)}")

    console.rule("[bold]3. Start the fleet and the agents")
    fleet = FleetServer(work / "fleet", broker_url=broker, trust_dir=trust).start()
    client = FleetClient(fleet.url, token=fleet.admin_token)
    devices = [f"demo-{i + 1}" for i in range(agents)]
    procs: list[AgentProcess] = []
    rollouts: list[Rollout] = []
    ok_gate = True
    try:
        for d in devices:  # each agent enrols with its own one-time token: its own broker secret and API token
            identity = client.enrol(d, [GROUP])
            procs.append(AgentProcess(d, work / "agents" / d, fleet.broker_url, trust / "root.json", fleet.url,
                                      work / "logs" / f"{d}.log", identity=identity))
        console.print(f"  fleet API {fleet.url}, MQTT broker {fleet.broker_url}" + ("" if broker else " (embedded)")
                      + ", log logs/fleet.log")
        console.print(f"  demo secrets (admin token, fleet broker password): {work / 'fleet' / 'demo-secrets.json'} (0600);"
                      " each agent enrolled with a one-time token into its state/identity.json")
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready()
            client.register(p.device_id, [GROUP])
            console.print(f"  agent {p.device_id}: local API {p.api_url} (127.0.0.1 only), log {p.log_path.relative_to(work)}")
        client.wait_online(devices)
        for b in built:
            client.upload(b.bundle)

        for step, b in enumerate(built, 4):
            staged = b.version > 1
            how = f"in stages behind a quality gate ({GATE:g} label accuracy)" if staged else "to every device at once"
            console.rule(f"[bold]{step}. Roll out v{b.version} {how}: {b.note}")
            if b.version == 1:
                console.print(f"  after each rollout every device is asked: [italic]{QUESTION}[/]")
            if b.version == 3:
                refused = client.http.post("/api/v1/rollouts", json=_staged(1, GATE))
                gate_ok = refused.status_code == 422 and refused.json().get("code") == "gate_failed"
                ok_gate &= gate_ok
                console.print(f"  v1 again over v2: {'[green]refused[/]' if gate_ok else '[red]accepted[/]'} by the "
                              f"quality gate: [italic]{refused.json().get('detail', refused.text)}[/]")
            t0 = time.monotonic()
            with console.status(f"rolling {NAME} v{b.version} out to {len(devices)} devices..."):
                if staged:
                    record, dep = staged_rollout(client, _staged(b.version, GATE))
                else:
                    record, dep = None, rollout(client, NAME, b.version, GROUP)
            seconds = time.monotonic() - t0
            targets = {t["device_id"]: t for t in dep["targets"]}
            answers = {p.device_id: ask(p.api_url) for p in procs}
            r = Rollout(b.version, targets, answers, seconds, record)
            rollouts.append(r)
            _print_rollout(r)

        console.rule("[bold]7. What the fleet recorded")
        ok = _summary(client, devices, rollouts) and ok_gate

        console.rule("[bold]8. Attacks the fleet and the agents refuse")
        ok &= _attacks(fleet, client, procs, built[0].folder, work)
    finally:
        for p in procs:
            p.stop()
        client.close()
        fleet.stop()
    verdict = "[green]PASS[/]" if ok else "[red]FAIL[/]"
    console.print(Panel.fit(f"{verdict}: v1 -> v2 in stages -> v3 caught by its canary, the other {len(devices) - 1} agents "
                            "never saw it; v1 again refused by the quality gate; every attack refused; "
                            f"{time.monotonic() - started:.0f}s in all. Work folder: {work}", border_style="green" if ok else "red"))
    raise typer.Exit(0 if ok else 1)


def _attacks(fleet, client, procs, folder: Path, work: Path) -> bool:
    """Try each attack of `slmops.probes` on the running fleet and agents; print what must and what did happen."""
    from slmops.probes import probe_all

    with console.status("trying attacks on the fleet and the agents..."):
        probes = probe_all(fleet, client, procs, folder, work)
    t = Table(title="every attack gets a refusal, and changes nothing", title_justify="left")
    for col in ("attack", "must", "happened", ""):
        t.add_column(col)
    for p in probes:
        t.add_row(p.attack, p.expected, p.observed, "[green]✓[/]" if p.ok else "[red]✗[/]")
    console.print(t)
    return all(p.ok for p in probes)


def _summary(client, devices: list[str], rollouts: list[Rollout]) -> bool:
    """Check the fleet's record of every device; print one row each and the status reports it stored."""
    t = Table(title="what the fleet recorded, per device", title_justify="left")
    for col in ("device", *(f"v{r.version}" for r in rollouts), "serving now", "online"):
        t.add_column(col)
    ok, chains = True, {}
    v3 = next(r for r in rollouts if r.version == 3)
    canaries = [d for d, tgt in v3.targets.items() if tgt["state"] != "cancelled"]
    ok &= len(canaries) == 1 and v3.staged is not None and v3.staged["state"] == "aborted"
    v2 = next(r for r in rollouts if r.version == 2)
    ok &= v2.staged is not None and v2.staged["state"] == "succeeded"
    for dev in devices:
        detail = client.device(dev)
        outcomes = [r.targets[dev]["state"] for r in rollouts]
        serving = (detail.get("active") or {}).get("version")
        expected = {1: "active", 2: "active", 3: "rolled_back" if dev in canaries else "cancelled"}
        ok &= outcomes == [expected[r.version] for r in rollouts] and serving == 2
        ok &= all(r.answers[dev][0] == f"{NAME}:v{2 if r.version == 3 else r.version}" for r in rollouts)
        t.add_row(dev, *map(_outcome, outcomes), f"v{serving}", "yes" if detail["online"] else "no")
        chains.setdefault(_chain(h["state"] for h in detail["history"]), []).append(dev)
    console.print(t)
    for chain, who in chains.items():
        console.print(f"  status reports from {', '.join(who)}, oldest first:")
        for line in chain.split("\n"):
            console.print(f"    {line}")
    return ok


def _chain(states) -> str:
    """One line per update: received → downloading → … → ACTIVE."""
    lines, cur = [], []
    for s in states:
        cur.append(s.upper() if s in ("active", "rejected", "rolled_back", "failed") else s)
        if cur[-1].isupper():
            lines.append(" → ".join(cur))
            cur = []
    if cur:
        lines.append(" → ".join(cur))
    return "\n".join(lines)
