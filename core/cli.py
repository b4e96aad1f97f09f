"""What every command shares: one logging setup and one mapping from the toolkit's errors to exit statuses.

Library modules log through ``logging.getLogger(__name__)`` and never print; a command module (nothing imports it)
parses its arguments, calls :func:`setup_logging` and runs its body under :func:`run_command`:

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        return run_command(lambda: body(args))
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from core.errors import ConfigError, InputError, TrainingError
from core.offline import no_hub_kernels
from core.quiet import quiet_libraries

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _CurrentStdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is when a record is emitted (pytest's capture swaps it)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; the property always reads sys.stdout
        pass


_HANDLER_NAME = "qlml"
TOOLKIT_LOGGERS = ("core", "train", "infer", "benchmarks")


def setup_logging(verbose: bool = False) -> None:
    """The toolkit's messages, one per line on stdout as before; ``verbose`` adds debug messages and libraries' INFO.

    Idempotent: a second call (tests run many commands in one process) only changes the level.
    """
    level = logging.DEBUG if verbose else logging.INFO
    for name in TOOLKIT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
            handler = _CurrentStdout()
            handler.set_name(_HANDLER_NAME)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    quiet_libraries(verbose)  # known-harmless library warnings (core/quiet.py); --verbose shows them
    no_hub_kernels()  # before any command imports peft / bitsandbytes (core/offline.py)


def module_doc(name: str) -> str | None:
    """The docstring of module ``name`` read from its source, without importing it: a command's ``-h`` shows its
    library's method doc without paying for torch / scikit-learn (``python -m train -h`` built every parser in 5.7 s
    when the prune command imported its library for the doc)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages and libraries' info messages")


def run_command(body: Callable[[], int | None]) -> int:
    """Run a command's body: bad input or config -> ``error: <message>`` on stderr and exit 2, a training failure ->
    the same line and exit 1, both without a traceback; anything else is a bug and keeps its traceback."""
    try:
        return int(body() or EXIT_OK)
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
