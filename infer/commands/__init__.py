"""The ``python -m infer`` subcommands: each module parses its arguments and calls the library; nothing
imports them."""
