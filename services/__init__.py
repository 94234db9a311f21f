"""Shared protocol, queue, clients, workers, CLI and monitoring of the RLAD stack."""
