"""Generated from protos/lmforge/v1 by `make protos`; never edit by hand."""
