"""`slmops sim`: run N simulated devices against a broker until stopped (Ctrl-C, SIGTERM) or `--duration` ends.

Shows live progress (connected, commands, reports, terminal states) unless `--quiet`; writes the counts every
second to `--status-file` (JSON, replaced atomically) and once at the end to `--summary`, and prints a summary.
Passwords never go on the command line: `--credentials FILE.csv` (device_id,username,password) or the pattern in
SLMOPS_SIM_PASSWORD_PATTERN (`{id}` becomes the device id) with `--username '{id}'`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from protocol.errors import SlmopsError

app = typer.Typer(invoke_without_command=True, add_completion=False)
TERMINAL = ("active", "rolled_back", "failed", "rejected")


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@app.callback()
def sim(
    broker: Annotated[str, typer.Option(help="broker URL: mqtt:// (3.1.1), mqtt5://, mqtts://, mqtt5s://")],
    trust_root: Annotated[Path, typer.Option(help="root.json the devices trust (slmops keys init)")],
    devices: Annotated[int, typer.Option(help="number of devices (ignored with --credentials)")] = 100,
    prefix: Annotated[str, typer.Option(help="device ids are PREFIX-00000, PREFIX-00001, ...")] = "sim",
    credentials: Annotated[Optional[Path], typer.Option(help="CSV device_id,username,password")] = None,
    username: Annotated[Optional[str], typer.Option(help="username pattern ({id}: the device id)")] = None,
    bundle_origin: Annotated[list[str], typer.Option(help="fleet URL bundles must come from (repeatable)")] = [],  # noqa: B006
    active: Annotated[Optional[str], typer.Option(help="NAME:VERSION every device serves at start")] = None,
    download_s: float = 0.0, verify_s: float = 0.0, install_s: float = 0.0, health_s: float = 0.0,
    fail_rate: Annotated[float, typer.Option(help="share of updates whose health check fails")] = 0.0,
    fail_bundle: Annotated[list[str], typer.Option(help="NAME:VERSION every device fails (repeatable)")] = [],  # noqa: B006
    silent_rate: Annotated[float, typer.Option(help="share of updates after which the device falls silent")] = 0.0,
    telemetry_s: Annotated[float, typer.Option(help="seconds between telemetry samples; 0: none")] = 0.0,
    eval_metric: Annotated[Optional[str], typer.Option(help="report an eval score under this metric")] = None,
    eval_score: float = 0.9,
    seed: int = 0,
    duration: Annotated[Optional[float], typer.Option(help="stop after this many seconds")] = None,
    sources: Annotated[Optional[int], typer.Option(help="127.0.x.y source addresses (default: one per 1000)")] = None,
    max_connecting: Annotated[int, typer.Option(help="connects waiting for a CONNACK at once")] = 256,
    broker_ca: Annotated[Optional[Path], typer.Option(help="CA of an mqtts:// broker")] = None,
    status_file: Annotated[Optional[Path], typer.Option(help="write the counts here every second")] = None,
    summary: Annotated[Optional[Path], typer.Option(help="write the final counts here")] = None,
    quiet: Annotated[bool, typer.Option(help="no live progress")] = False,
) -> None:
    """Simulate devices that speak the slmops protocol exactly as the agent does, without downloading bundles."""
    from rich.console import Console

    from . import accounts as acc
    from .behaviour import Durations, Knobs, parse_bundle
    from .sim import Simulator

    console = Console(stderr=True)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        if credentials is not None:
            accounts = acc.from_csv(credentials)
        else:
            pattern = os.environ.get("SLMOPS_SIM_PASSWORD_PATTERN")
            accounts = acc.with_pattern(acc.numbered(devices, prefix), username=username, password=pattern)
        knobs = Knobs(
            durations=Durations(download_s, verify_s, install_s, health_s), fail_rate=fail_rate,
            fail_bundles=tuple(parse_bundle(b) for b in fail_bundle), silent_rate=silent_rate,
            telemetry_s=telemetry_s, eval_metric=eval_metric, eval_score=eval_score, seed=seed,
        )
        sim_ = Simulator(broker, accounts, trust_root=trust_root.read_bytes(), knobs=knobs, origins=bundle_origin,
                         active=parse_bundle(active) if active else None, ca_file=broker_ca, sources=sources,
                         max_connecting=max_connecting)
    except (SlmopsError, OSError) as exc:
        console.print(f"[red]slmops sim: {exc}[/red]")
        raise typer.Exit(2) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.time()
    if status_file is not None:
        sim_.tick(1.0, lambda st: _write_json(status_file, {**st.as_dict(), "at": time.time()}))
    if quiet:
        stats = sim_.run(stop, duration)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                      TimeElapsedColumn(), console=console) as progress:
            conn = progress.add_task("connected", total=len(accounts), note="")
            done = progress.add_task("finished", total=len(accounts), note="")

            def show(st) -> None:
                progress.update(conn, completed=st.connected, note=f"refused {st.refused}")
                finished = sum(st.states.get(s, 0) for s in TERMINAL)
                progress.update(done, completed=min(finished, len(accounts)),
                                note=f"commands {st.commands}  reports {st.reports}  acked {st.acked}")
            sim_.tick(0.5, show)
            stats = sim_.run(stop, duration)
    doc = {**stats.as_dict(), "elapsed_s": round(time.time() - started, 3), "all_connected_s": sim_.all_connected_s,
           "loop_errors": sim_.loop.errors}
    if summary is not None:
        _write_json(summary, doc)
    _print_summary(console, doc)


def _print_summary(console, doc: dict) -> None:
    from rich.table import Table

    t = Table(title="slmops sim", show_header=False)
    for key in ("devices", "connects", "refused", "disconnects", "commands", "reports", "acked", "telemetry", "resent"):
        t.add_row(key, str(doc[key]))
    t.add_row("all connected after", f"{doc['all_connected_s']:.1f} s" if doc["all_connected_s"] else "never")
    t.add_row("reports by state", ", ".join(f"{k} {v}" for k, v in sorted(doc["states"].items())) or "-")
    t.add_row("commands dropped", ", ".join(f"{k} {v}" for k, v in sorted(doc["dropped"].items())) or "none")
    console.print(t)
