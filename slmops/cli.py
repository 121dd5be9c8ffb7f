"""The `slmops` command: one entry point, a sub-command per package, each imported only when used.

`main()` looks at which sub-command was asked for and imports only that package's typer app; the others appear
in `slmops --help` as placeholders with their one-line help. So `slmops agent run` never loads the trainer
(torch) or the fleet (SQLAlchemy, amqtt).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

# name -> (module, attribute holding a typer.Typer, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("trainer.cli", "app", "Fine-tune, distil, export and evaluate models; run a recipe to a signed bundle."),
    "keys": ("fleet.keys_cli", "app", "Trust root and Ed25519 keys: init, rotate, revoke, show, generate."),
    "bundle": ("fleet.cli", "bundle_app", "Build, sign, verify and inspect model bundles."),
    "ca": ("fleet.ca_cli", "app", "The project CA: TLS certificates for the broker, the fleet and each device."),
    "fleet": ("fleet.cli", "app", "Run the fleet service; list devices; deploy bundles."),
    "agent": ("agent.cli", "app", "Run the on-device agent."),
    "demo": ("slmops.demo", "app", "Run the whole story on this machine and print a report."),
    "sim": ("devsim.cli", "app", "Simulate N devices speaking the protocol (one process, one epoll loop) for benchmarks."),
}


def build_app(argv: list[str]) -> typer.Typer:
    wanted = next((a for a in argv if not a.startswith("-")), None)
    app = typer.Typer(
        help="slmops: build, sign and roll out small language models to device fleets; private local inference.",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        add_completion=False,
    )
    for name, (module, attr, help_) in COMMANDS.items():
        if name == wanted:
            sub = getattr(importlib.import_module(module), attr)
            if name == "train":  # the recipe runner needs the fleet's bundle builder: wired here, not in trainer/
                sub.command("pipeline")(importlib.import_module("slmops.pipeline").pipeline)
        else:
            sub = typer.Typer(help=help_)
            sub.callback(invoke_without_command=True)(lambda: None)
        app.add_typer(sub, name=name, help=help_)
    return app


def main(argv: list[str] | None = None) -> None:
    for var in ("ORT_DISABLE_TELEMETRY", "OLIVE_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    args = sys.argv[1:] if argv is None else argv
    build_app(args)(args, prog_name="slmops")


if __name__ == "__main__":
    main()
