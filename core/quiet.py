"""Quiet by default: the known-harmless messages that libraries print on every run are filtered where they come from.

Each filter below names the one message it drops and why that message is harmless here; anything else a library
says still shows. :func:`core.cli.setup_logging` calls :func:`quiet_libraries` (``--verbose`` turns every filter
off again); a library caller that never chose gets them when :mod:`infer.predict` loads a model
(:func:`quiet_by_default`). Nothing here imports a library: the filters hang on the standard ``logging`` loggers and the
``warnings`` filter list by name, so a command that never loads a model pays nothing for them.
"""

from __future__ import annotations

import logging
import re
import warnings

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

FRESH_HEAD_KEYS = ("score.weight", "score.bias")
"""The classification head ``AutoModelForSequenceClassification`` adds to a causal-LM checkpoint."""


def fresh_head_report(message: str) -> bool:
    """Is ``message`` transformers' LOAD REPORT listing nothing but the freshly initialised ``score`` head as MISSING?

    Every base-model load of a classifier reports ``score.weight | MISSING`` (the checkpoint is a causal LM; the head
    is created here, seeded, trained, and saved with every adapter), so that report says nothing. A report with any
    other row (an unexpected or mismatched key, a missing layer weight) still shows.
    """
    text = _ANSI.sub("", message)
    if "LOAD REPORT" not in text:
        return False
    rows = [line for line in text.splitlines() if line.count("|") >= 2 and not line.lstrip().startswith("Key ")]
    if not rows:
        return False
    for row in rows:
        key, status = (cell.strip() for cell in row.split("|")[:2])
        if key not in FRESH_HEAD_KEYS or status != "MISSING":
            return False
    return True


def _torch_dtype_deprecation(message: str) -> bool:
    # transformers 5 renamed `torch_dtype` to `dtype`; the old name stays as a property that warns once when a
    # library (or a checkpoint's code) still reads it. The toolkit passes `dtype=`; the value is the same.
    return message.startswith("`torch_dtype` is deprecated")


class _Drop(logging.Filter):
    """Drops the records one of ``tests`` recognises; set on the logger that emits them (the source)."""

    def __init__(self, *tests):
        super().__init__("qlml-quiet")
        self.tests = tests

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(test(message) for test in self.tests)


_LOG_FILTERS = {
    # The LOAD REPORT and the `torch_dtype=` keyword's deprecation are logged here (from_pretrained).
    "transformers.modeling_utils": _Drop(fresh_head_report, _torch_dtype_deprecation),
    # The `config.torch_dtype` property's deprecation.
    "transformers.configuration_utils": _Drop(_torch_dtype_deprecation),
}

_WARNINGS = (
    # transformers 5 renamed `is_gradient_checkpointing` to `is_activation_checkpointing`; peft (0.21) still reads
    # the old name when it wraps a model, which warns on every training run and every adapter load. Same value.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)

_installed: list[tuple] = []  # the entries this module put into warnings.filters
_verbose: bool | None = None  # the last quiet_libraries() call's choice; None: never called (library use)


def quiet_libraries(verbose: bool = False) -> None:
    """Install the filters above (``verbose=False``) or take them out again (``verbose=True``). Idempotent."""
    global _verbose
    _verbose = verbose
    for name, flt in _LOG_FILTERS.items():
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(flt)
        elif flt not in logger.filters:
            logger.addFilter(flt)
    # Taken out and re-inserted, so that they stay in front of filters added since (pytest's, -W ...). Removing an
    # "ignore" entry needs no cache reset: the warnings module records only warnings it has shown.
    while _installed:
        entry = _installed.pop()
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    if not verbose:
        for message, category in _WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
            _installed.append(warnings.filters[0])


def libraries_verbose() -> bool:
    """True after ``quiet_libraries(True)`` (``--verbose``): library noise is shown as it comes."""
    return _verbose is True


def quiet_by_default() -> None:
    """The filters for a library caller that never chose (no :func:`core.cli.setup_logging`, e.g. a notebook)."""
    if _verbose is None:
        quiet_libraries(False)
