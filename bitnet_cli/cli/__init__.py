"""The `bitnet` command: thin Typer commands that parse, call one core function, and render,
grouped as the help shows them (train_commands, resume_command, watch_commands,
runs_commands, chat_command, serve_command, play_commands, cost_command, ship_commands; app.py is what they
share). May import every folder; nothing imports it. No torch at import, so `bitnet --help`, `status`, `plot` and `cost`
answer instantly; commands that need torch import the core inside their function body."""

import inspect

from bitnet_cli.cli.app import app, unwrap_help

# Importing the command modules registers them, in the order the help lists their panels.
from bitnet_cli.cli import (train_commands, resume_command, watch_commands,  # noqa: F401,I001
                            runs_commands, chat_command, play_commands, cost_command,
                            ship_commands, serve_command)

for _command in [*app.registered_commands,
                 *(c for group in app.registered_groups for c in group.typer_instance.registered_commands)]:
    _command.help = unwrap_help(_command.help or inspect.getdoc(_command.callback) or "")


def main() -> None:
    app()
