"""Framework backends. Each is imported lazily by name (see ``registry``)."""
