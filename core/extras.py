"""The optional parts of the install: a command (or a setting, such as ``train.report_to: [tensorboard]``) whose
extra or package is missing says which one to install (exit 2)."""

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


def require_package(module: str, what: str, distribution: str | None = None) -> None:
    """Import ``module`` (a package no extra of this project installs, e.g. ``wandb``) or raise an
    :class:`InputError` saying that ``what`` needs it and how to install it (``distribution``: its pip name)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise InputError(f"{what} needs the {module} package, which is not installed: "
                         f"pip install {distribution or module}") from None
