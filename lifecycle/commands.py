"""Subcommands of the lifecycle package, in the order `lmforge --help` lists them.

Each entry is "module:function"; the function takes argparse's subparsers and adds one subcommand.
"""

COMMANDS = [
    "lifecycle.demo:add_command",
    "lifecycle.tokenizer:add_command",
    "lifecycle.recipes.pretrain:add_command",
    "lifecycle.recipes.draft_data:add_command",
    "lifecycle.recipes.sft:add_command",
    "lifecycle.recipes.reward:add_command",
    "lifecycle.recipes.dpo:add_command",
    "lifecycle.export:add_command",
    "lifecycle.plan:add_command",
    "lifecycle.checkpoint:add_command",
    "lifecycle.bench:add_command",
    "lifecycle.data.curate.cli:add_command",
]
