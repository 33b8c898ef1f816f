"""vmsilo.guest."""
