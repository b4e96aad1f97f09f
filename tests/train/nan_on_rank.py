"""``torchrun ... tests/train/nan_on_rank.py R train ARGS...``: ``python -m train ARGS`` where rank R's loss is NaN
(the multilabel loss is replaced on that rank only), so tests can prove every rank stops together."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train.run
from train.__main__ import main

if __name__ == "__main__":
    rank, module, *args = sys.argv[1:]
    assert module == "train", module
    if os.environ.get("RANK") == rank:
        real = train.run.multilabel_loss
        train.run.multilabel_loss = lambda *a, **k: real(*a, **k) * float("nan")
    sys.exit(main(args))
