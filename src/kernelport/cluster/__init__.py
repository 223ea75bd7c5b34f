"""Above the server: the gateway in front of several KernelPort nodes (docs/gateway.md)."""
