"""Model lifecycle drivers that sit above core (the repository poller)."""
