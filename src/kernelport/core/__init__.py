"""The I/O-free core: it imports no web, RPC, metrics or ML framework (a test enforces it)."""
