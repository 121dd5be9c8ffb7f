"""`slmops train pipeline CONFIG`: the trainer's recipe runner wired to the fleet's bundle builder.

The trainer never imports the fleet, so the recipe runner (`trainer.pipeline.run`) takes the bundle step as an
argument; this module gives it `fleet.bundles.build_bundle` with the recipe's signing keys (`pack`) and the HTTP
upload (`trainer.pipeline.http_upload`). `slmops.cli` adds the `pipeline` command to `slmops train`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import SlmopsError
from trainer.pipeline import BundleSpec, Packer, PipelineResult, expires_for, http_upload, load_config

console = Console()
err_console = Console(stderr=True)


def load_signers(spec: BundleSpec) -> list:
    """The recipe's signing keys, read before any step runs, so a missing key fails at once."""
    from protocol.errors import ConfigError
    from protocol.trust import PrivateKey

    signers = []
    for path in spec.keys:
        try:
            signers.append(PrivateKey.from_pem(path.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read the signing key {path}: {exc.strerror}") from exc
    return signers


def packer(signers: list) -> Packer:
    """A bundle step that builds and signs with `signers` what the recipe's bundle table asks for."""

    def pack(model_dir: Path, spec: BundleSpec, created: datetime) -> Path:
        from fleet.bundles import build_bundle

        precision, provider = _target(model_dir)
        build_bundle(model_dir, spec.out, name=spec.name, version=spec.version, signers=signers, now=created,
                     base_model=spec.base_model, precision=precision, execution_provider=provider,
                     expires=expires_for(spec, created), description=spec.description)
        return spec.out

    return pack


def _target(model_dir: Path) -> tuple[str, str]:
    """The precision and execution provider the export step recorded in export.json (int4, cpu without one)."""
    import json

    try:
        doc = json.loads((model_dir / "export.json").read_text(encoding="utf-8"))
        return str(doc["precision"]), str(doc["execution_provider"])
    except (OSError, ValueError, KeyError, TypeError):
        return "int4", "cpu"


def run_file(config: Path, *, keys: list[Path] | None = None, progress: bool = True,
             log=lambda line: None) -> PipelineResult:
    """Load a recipe, add any extra signing keys, and run it."""
    from trainer.pipeline import run

    cfg = load_config(config)
    if keys:
        cfg = cfg.model_copy(update={"bundle": cfg.bundle.model_copy(
            update={"keys": (*cfg.bundle.keys, *(k.resolve() for k in keys))})})
    return run(cfg, pack=packer(load_signers(cfg.bundle)), upload=http_upload, progress=progress, log=log)


def pipeline(
    config: Annotated[Path, typer.Argument(help="Recipe file (.toml, .yaml or .yml).")],
    key: Annotated[Optional[list[Path]], typer.Option(help="Extra private key to sign the bundle with.")] = None,
) -> None:
    """Run a recipe (base model, fine-tune or distil, export, evaluate) and end with a signed bundle."""
    try:
        result = run_file(config, keys=key, log=lambda line: console.print(f"  {escape(line)}"))
    except SlmopsError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc).splitlines()[0])}", soft_wrap=True)
        raise typer.Exit(code=2) from exc
    steps = Table(title="steps", title_justify="left")
    for col in ("step", "key", "", "seconds"):
        steps.add_column(col)
    for s in result.steps:
        steps.add_row(s.name, s.key, "reused" if s.reused else "built", f"{s.seconds:.1f}")
    console.print(steps)
    metrics = Table(title="metrics (* in the signed manifest)", title_justify="left")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for name, value in sorted(result.metrics.items()):
        metrics.add_row(name + (" *" if name in result.manifest_metrics else ""), f"{value:.4g}")
    console.print(metrics)
    console.print(f"bundle [bold]{result.bundle}[/bold] sha256 {result.sha256}", soft_wrap=True)
    if not result.reproducible:
        console.print("[yellow]note:[/yellow] the manifest's creation time is now; set bundle.created or "
                      "SOURCE_DATE_EPOCH to get the same bytes from the same inputs")
    if result.uploaded is not None:
        console.print(f"uploaded: {result.uploaded}")
