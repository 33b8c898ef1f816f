"""vmsilo.config."""
