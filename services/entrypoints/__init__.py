"""Thin entry points, one per `rlad` subcommand: parse options, import lazily, run."""
