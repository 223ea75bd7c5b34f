"""KServe V2 REST front end (with Triton's binary tensor data extension)."""
