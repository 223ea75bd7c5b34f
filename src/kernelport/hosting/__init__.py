"""Ways to host the server other than one plain asyncio process (see ``envoy``)."""
