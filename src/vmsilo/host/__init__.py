"""vmsilo.host."""
