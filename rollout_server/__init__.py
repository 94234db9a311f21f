"""vLLM sampling service with versioned, verified, atomic weight updates."""
