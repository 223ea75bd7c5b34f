"""Metrics, logging and tracing. Nothing here runs on import; the server wires it up."""
