"""Hooks a caller (a test, a benchmark) hands to a training recipe; the step loops call them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from train.checkpoint import Progress


@dataclass
class Callbacks:
    """Hooks each step loop calls; each gets the run's progress."""

    on_checkpoint: list[Callable[[Progress, bool], None]] = field(default_factory=list)
    """After each checkpoint is written: (progress, resumed). Tests kill the process here."""
    on_step: list[Callable[[Progress, float], None]] = field(default_factory=list)
    """After each optimizer step: (progress, mean loss on this rank)."""
