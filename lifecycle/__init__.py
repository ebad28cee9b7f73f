"""lmforge lifecycle: data, tokenizer, training recipes, checkpoints and export."""

__version__ = "0.1.0"
