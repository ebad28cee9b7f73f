"""Backends behind the API layers: `base.Backend` (the interface), `native.NativeBackend` (lmforge's engine)."""
