"""The toolkit's error types: every command maps them to one ``error: <message>`` line and an exit status."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (file, column, row); the message names what is wrong. Exit status 2."""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key(s) and, where known, the file. Exit status 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message says what to change. Exit status 1."""
