"""vmsilo.cli."""
