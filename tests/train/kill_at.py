"""``python tests/train/kill_at.py N train ARGS...``: ``python -m train ARGS`` with a test callback injected into the
training engine that hard-kills the process right after its first checkpoint at an optimizer step >= N (never in a
resumed run), so tests can prove that a killed-and-resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.__main__ import main
from train.callbacks import Callbacks


def kill_after(step: int):
    def on_checkpoint(progress, resumed: bool) -> None:
        if not resumed and progress.step >= step:
            os._exit(137)

    return on_checkpoint


if __name__ == "__main__":
    at, module, *args = sys.argv[1:]
    assert module == "train", module
    sys.exit(main(args, callbacks=Callbacks(on_checkpoint=[kill_after(int(at))])))
