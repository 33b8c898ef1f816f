"""vmsilo.supervisor."""
