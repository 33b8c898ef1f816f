"""vmsilo.backends."""
