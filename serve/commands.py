"""Subcommands of the serve package, in the order `lmforge --help` lists them."""

COMMANDS: list[str] = [
    "serve.launch:add_command",
    "serve.chat:add_command",
    "serve.evaluation.cli:add_command",
]
