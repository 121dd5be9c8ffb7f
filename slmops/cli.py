"""The `slmops` command: one entry point, a sub-command per package, each imported only when used.

`slmops agent run` therefore never loads the trainer (torch) or the fleet (SQLAlchemy, amqtt).
"""

from __future__ import annotations

import importlib
import os

import click

# name -> (module, attribute holding a typer.Typer, one-line help shown by `slmops --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("trainer.cli", "app", "Build the tiny reference model, export to onnxruntime-genai int4, evaluate."),
    "keys": ("fleet.cli", "keys_app", "Generate Ed25519 signing keys."),
    "bundle": ("fleet.cli", "bundle_app", "Build, sign, verify and inspect model bundles."),
    "fleet": ("fleet.cli", "app", "Run the fleet service; list devices; deploy bundles."),
    "agent": ("agent.cli", "app", "Run the on-device agent."),
    "demo": ("slmops.demo", "app", "Run the whole story on this machine and print a report."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        from typer.main import get_command

        module, attr, help_ = COMMANDS[name]
        cmd = get_command(getattr(importlib.import_module(module), attr))
        cmd.name, cmd.help = name, cmd.help or help_
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, h) for name, (_, _, h) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="slmops")
def cli() -> None:
    """slmops: build, sign and roll out small language models to device fleets; private local inference."""


def main() -> None:
    for var in ("ORT_DISABLE_TELEMETRY", "OLIVE_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    cli()


if __name__ == "__main__":
    main()
