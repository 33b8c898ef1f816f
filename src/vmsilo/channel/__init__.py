"""vmsilo.channel."""
