"""Subcommands of the serve package (none yet: the engine and server arrive with issues 3 and 4)."""

COMMANDS: list[str] = []
