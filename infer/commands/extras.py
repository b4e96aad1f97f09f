"""The optional parts of the install: a command whose extra is missing says which one to install (exit 2)."""

from __future__ import annotations

import importlib

from core.errors import InputError


def require_extra(extra: str, command: str, *modules: str) -> None:
    """Import ``modules`` (the packages ``pip install 'qlora-multilabel[extra]'`` adds) or raise an
    :class:`InputError` naming the extra, so that ``command`` stops with ``error: ...`` and exit 2, no traceback."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(f"{command} needs the '{extra}' extra ({name} is not installed): "
                             f"pip install 'qlora-multilabel[{extra}]' (or pip install -e '.[{extra}]' in a clone)"
                             ) from None
