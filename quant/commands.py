"""Subcommands of the quant package: `lmforge quantize` (issue 5)."""

COMMANDS = [
    "quant.cli:add_command",
]
