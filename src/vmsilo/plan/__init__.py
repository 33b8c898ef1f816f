"""vmsilo.plan."""
