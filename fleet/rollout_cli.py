"""`slmops fleet rollout create|list|show|pause|resume|cancel|watch`, and `slmops fleet groups|tag`.

Each command is one HTTP call to a running fleet (fleet/cli.py `_http`: --url, --token, --ca/--cert/--key).
`rollout watch` (and `create --watch`) polls the rollout once a second and draws one rich progress bar per wave
(devices finished of the wave's size, with updated/failed counts and the held-out score the devices measured)
until the rollout ends; its exit code says how it ended: 0 succeeded, 1 aborted, cancelled or superseded.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from protocol.errors import ConfigError

from .cli import DEFAULT_URL, CaOpt, CertOpt, KeyOpt, TokenOpt, UrlOpt, _errors, _http, _path_part, app, out

rollout_app = typer.Typer(help="Staged rollouts: a canary, then waves, behind quality gates.", no_args_is_help=True)

WAVE_RE = re.compile(r"(\d{1,7})(%?)")  # "25%" (cumulative share) or "100" (devices added)
GATE_RE = re.compile(r"([a-z][a-z0-9_]{0,63})>=(0(?:\.\d{1,6})?|1(?:\.0{1,6})?)")
WINDOW_RE = re.compile(r"(\d\d:\d\d)-(\d\d:\d\d)")
FINAL = {"succeeded": 0, "aborted": 1, "cancelled": 1, "superseded": 1}
POLL_S = 1.0


def _step(text: str, what: str) -> dict[str, Any]:
    m = WAVE_RE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"{what} {text!r} is not a count (e.g. 10) or a percent (e.g. 25%)")
    n = int(m.group(1))
    if m.group(2):
        if not 0 < n <= 100:
            raise ConfigError(f"{what} {text!r}: a percent is from 1% to 100%")
        return {"percent": n}
    if n < 1:
        raise ConfigError(f"{what} {text!r}: a count is at least 1")
    return {"count": n}


def build_body(*, bundle: str, version: int, group: str | None, query: str | None, canary: str | None,
               waves: list[str], success: float, error: float, max_parallel: int, timeout: int, resend: int,
               timeout_as: str, window: str | None, rollback: bool, pause_between: bool, gates: list[str],
               allow_regression: bool, download_only: bool = False) -> dict[str, Any]:
    """The POST /api/v1/rollouts body from the command's options (refusing malformed ones with the fix)."""
    if (group is None) == (query is None):
        raise ConfigError("give exactly one of --group and --query")
    strategy: dict[str, Any] = {
        "canary": None if canary in (None, "0", "none") else _step(canary, "--canary"),  # type: ignore[arg-type]
        "waves": [_step(w, "--wave") for w in waves] or [{"percent": 100}],
        "success_threshold": success, "error_threshold": error, "max_parallel": max_parallel,
        "device_timeout_s": timeout, "resend_after_s": resend, "timeout_as": timeout_as,
        "rollback_on_abort": rollback, "pause_between_waves": pause_between, "download_only": download_only,
    }
    if window is not None:
        m = WINDOW_RE.fullmatch(window.strip())
        if m is None:
            raise ConfigError(f"--window {window!r} is not HH:MM-HH:MM (UTC), e.g. 01:00-05:00")
        strategy["window"] = {"start": m.group(1), "end": m.group(2)}
    minimums: dict[str, float] = {}
    for g in gates:
        m = GATE_RE.fullmatch(g.replace(" ", ""))
        if m is None:
            raise ConfigError(f"--gate {g!r} is not METRIC>=SCORE with a score from 0 to 1, e.g. label_accuracy>=0.8")
        minimums[m.group(1)] = float(m.group(2))
    target = {"group": group} if group is not None else {"query": query}
    return {"bundle": {"name": bundle, "version": version}, "target": target, "strategy": strategy,
            "gate": {"min": minimums, "no_regression": not allow_regression}}


@rollout_app.command("create")
def create(
    bundle: Annotated[str, typer.Option(help="bundle name")],
    version: Annotated[int, typer.Option(help="bundle version", min=1)],
    group: Annotated[Optional[str], typer.Option(help="every device of this group")] = None,
    query: Annotated[Optional[str], typer.Option(help="tag query, e.g. site=berlin,tier=a (group=G for a group)")] = None,
    canary: Annotated[Optional[str], typer.Option(help="canary: a count (1) or a percent (5%); 0 for none")] = "1",
    wave: Annotated[Optional[list[str]], typer.Option(help="a wave: cumulative percent (25%) or count; repeat")] = None,
    success_threshold: Annotated[float, typer.Option(min=0, max=1, help="share of a wave updated to go on")] = 0.9,
    error_threshold: Annotated[float, typer.Option(min=0, max=1, help="share of a wave failed that aborts")] = 0.2,
    max_parallel: Annotated[int, typer.Option(min=1, help="devices updating at once")] = 1000,
    device_timeout: Annotated[int, typer.Option(min=5, help="seconds a device may take")] = 900,
    resend_after: Annotated[int, typer.Option(min=1, help="seconds of silence before asking a device again")] = 120,
    timeout_as: Annotated[str, typer.Option(help="a device past its timeout counts as: failed | pending")] = "failed",
    window: Annotated[Optional[str], typer.Option(help="maintenance window HH:MM-HH:MM, UTC")] = None,
    rollback_on_abort: Annotated[bool, typer.Option(help="send updated devices back if the rollout aborts")] = False,
    pause_between_waves: Annotated[bool, typer.Option(help="pause after each wave until 'rollout resume'")] = False,
    download_only: Annotated[bool, typer.Option(help="devices fetch and verify it only; a later rollout installs it")] = False,
    gate: Annotated[Optional[list[str]], typer.Option(help="METRIC>=SCORE the bundle and the devices must meet; repeat")] = None,
    allow_regression: Annotated[bool, typer.Option(help="accept a bundle scoring below the one it replaces")] = False,
    watch: Annotated[bool, typer.Option(help="follow the rollout until it ends")] = False,
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None,
) -> None:
    """Start a staged rollout of a stored bundle."""
    with _errors():
        body = build_body(bundle=bundle, version=version, group=group, query=query, canary=canary, waves=wave or [],
                          success=success_threshold, error=error_threshold, max_parallel=max_parallel,
                          timeout=device_timeout, resend=resend_after, timeout_as=timeout_as, window=window,
                          rollback=rollback_on_abort, pause_between=pause_between_waves, gates=gate or [],
                          allow_regression=allow_regression, download_only=download_only)
        r = _http("POST", url, "/api/v1/rollouts", token=token, tls=(ca, cert, key), json=body)
        out.print(f"rollout [bold]{r['id']}[/bold]: {bundle} v{version} -> {r['counts'] and sum(r['counts'].values())} "
                  f"device(s) in {len(r['waves'])} wave(s)")
    if watch:
        _watch(r["id"], url, token, (ca, cert, key))


@rollout_app.command("list")
def list_(state: Annotated[Optional[str], typer.Option(help="only rollouts in this state")] = None,
          url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None,
          key: KeyOpt = None) -> None:
    """List rollouts, newest first."""
    with _errors():
        rows = _http("GET", url, "/api/v1/rollouts", token=token, tls=(ca, cert, key),
                     params={"state": state} if state else None)["rollouts"]
        table = Table("rollout", "state", "bundle", "target", "wave", "updated", "failed", "devices", "created")
        for r in rows:
            c = r["counts"]
            wave = r["waves"][r["current_wave"]]["name"] if r["waves"] else "-"
            table.add_row(r["id"], _state(r["state"]), f"{r['bundle']['name']} v{r['bundle']['version']}",
                          escape(r["target"]["query"]), wave, str(c["succeeded"]), str(c["failed"] + c["rolled_back"]),
                          str(sum(c.values())), r["created_at"][:19])
        out.print(table)


@rollout_app.command("show")
def show(rollout_id: Annotated[str, typer.Argument(help="rollout id")], url: UrlOpt = DEFAULT_URL,
         token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """One rollout: its state, why, and each wave's figures."""
    with _errors():
        r = _http("GET", url, f"/api/v1/rollouts/{_path_part(rollout_id)}", token=token, tls=(ca, cert, key))
        out.print(f"rollout [bold]{r['id']}[/bold] {_state(r['state'])}: {escape(r['reason'])}")
        out.print(f"  {r['bundle']['name']} v{r['bundle']['version']} -> {escape(r['target']['query'])}; "
                  f"gate {r['gate'].get('min') or 'none'}")
        table = Table("wave", "state", "size", "pending", "updating", "updated", "failed", "timed out", "score")
        for w in r["waves"]:
            c = w["counts"]
            table.add_row(w["name"], w["state"], str(w["size"]), str(c["pending"] + c["sent"]), str(c["updating"]),
                          str(c["succeeded"]), str(c["failed"] + c["rolled_back"]), str(c["timed_out"]), _score(w))
        out.print(table)


def _action(rollout_id: str, what: str, url: str, token: str | None, tls: Any, body: Any = None) -> None:
    with _errors():
        r = _http("POST", url, f"/api/v1/rollouts/{_path_part(rollout_id)}/{what}", token=token, tls=tls, json=body)
        out.print(f"rollout [bold]{r['id']}[/bold] {_state(r['state'])}: {escape(r['reason'])}")


@rollout_app.command("pause")
def pause(rollout_id: Annotated[str, typer.Argument(help="rollout id")], url: UrlOpt = DEFAULT_URL,
          token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """Stop sending the bundle to more devices (devices already updating finish)."""
    _action(rollout_id, "pause", url, token, (ca, cert, key))


@rollout_app.command("resume")
def resume(rollout_id: Annotated[str, typer.Argument(help="rollout id")], url: UrlOpt = DEFAULT_URL,
           token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """Continue a paused rollout (and start the next wave if it paused between waves)."""
    _action(rollout_id, "resume", url, token, (ca, cert, key))


@rollout_app.command("cancel")
def cancel(rollout_id: Annotated[str, typer.Argument(help="rollout id")],
           rollback: Annotated[bool, typer.Option(help="send devices it updated back to their previous bundle")] = False,
           url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None,
           key: KeyOpt = None) -> None:
    """End a rollout: devices it has not reached never hear of it; those that have not begun installing stop."""
    _action(rollout_id, "cancel", url, token, (ca, cert, key), body={"rollback": rollback})


@rollout_app.command("watch")
def watch(rollout_id: Annotated[str, typer.Argument(help="rollout id")], url: UrlOpt = DEFAULT_URL,
          token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None) -> None:
    """Follow a rollout wave by wave until it ends (exit 0 if it succeeded, 1 otherwise)."""
    _watch(rollout_id, url, token, (ca, cert, key))


def _watch(rollout_id: str, url: str, token: str | None, tls: Any) -> None:
    path = f"/api/v1/rollouts/{_path_part(rollout_id)}"
    with _errors():
        r = _http("GET", url, path, token=token, tls=tls)
        with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), console=out, transient=False) as progress:
            tasks = {w["index"]: progress.add_task(w["name"], total=max(1, w["size"]), info="") for w in r["waves"]}
            while True:
                for w in r["waves"]:
                    c = w["counts"]
                    done = c["succeeded"] + c["failed"] + c["rolled_back"] + c["timed_out"] + c["cancelled"]
                    info = (f"{w['state']:<9} updated {c['succeeded']} failed {c['failed'] + c['rolled_back']}"
                            f" {_score(w)}")
                    progress.update(tasks[w["index"]], completed=done, total=max(1, w["size"], done), info=info)
                if r["state"] in FINAL:
                    break
                time.sleep(POLL_S)
                r = _http("GET", url, path, token=token, tls=tls)
        out.print(f"rollout [bold]{r['id']}[/bold] {_state(r['state'])}: {escape(r['reason'])}")
    raise typer.Exit(FINAL[r["state"]])


def _state(state: str) -> str:
    colour = {"succeeded": "green", "running": "cyan", "paused": "yellow"}.get(state, "red")
    return f"[{colour}]{state}[/{colour}]"


def _score(w: dict[str, Any]) -> str:
    s = w.get("score")
    return f"{s['metric']} {s['mean']:.3f} (min {s['min']:.3f}, n={s['n']})" if s else "-"


@app.command()
def groups(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None,
           key: KeyOpt = None) -> None:
    """List the groups devices belong to."""
    with _errors():
        table = Table("group", "devices")
        for g in _http("GET", url, "/api/v1/groups", token=token, tls=(ca, cert, key)):
            table.add_row(escape(g["name"]), str(g["devices"]))
        out.print(table)


@app.command()
def tag(device: Annotated[str, typer.Argument(help="device id")],
        tags: Annotated[list[str], typer.Argument(help="key=value to set, key= to remove")],
        url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None, cert: CertOpt = None,
        key: KeyOpt = None) -> None:
    """Tag a device (rollout target queries select devices by their tags)."""
    with _errors():
        body: dict[str, str | None] = {}
        for t in tags:
            k, eq, v = t.partition("=")
            if not eq:
                raise ConfigError(f"{t!r} is not key=value (key= removes the tag)")
            body[k] = v or None
        d = _http("PATCH", url, f"/api/v1/devices/{_path_part(device)}/tags", token=token, tls=(ca, cert, key),
                  json={"tags": body})
        shown = ", ".join(f"{k}={v}" for k, v in sorted(d["tags"].items())) or "none"
        out.print(f"device [bold]{escape(d['id'])}[/bold] tags: {escape(shown)}")
