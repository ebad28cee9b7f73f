"""Subcommands of the quant package (none yet: `lmforge quantize` arrives with issue 5)."""

COMMANDS: list[str] = []
