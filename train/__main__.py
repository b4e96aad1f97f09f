"""Config-driven QLoRA multilabel training with cross-validation.

Usage:
    python -m train --config configs/gemma-3-270m/qlora.yaml [--set train.lr=1e-4 --set cv.folds=[0]] [--resume]
    torchrun --nproc_per_node 2 -m train --config configs/gemma-2-9b/qlora.yaml      # DDP, one 4-bit copy per GPU
    python -m train --config configs/gemma-3-270m/qlora.yaml --print-config          # resolved config, no training
    python -m train trim-vocab ...    # shrink the embedding matrix to the corpus (python -m train trim-vocab -h)
    python -m train dapt ...          # domain-adaptive pretraining on unlabelled text (python -m train dapt -h)
    python -m train tfidf ...         # TF-IDF + logistic-regression baseline, same folds (python -m train tfidf -h)
    python -m train distill ...       # a student learning from teacher runs' soft targets (python -m train distill -h)
    python -m train prune ...         # drop decoder layers / MLP channels by importance (python -m train prune -h)

Exit status: 0 on success, 2 on bad input (config, data, paths), 1 when training fails.
"""

from __future__ import annotations

import argparse
import sys

from core.config import ConfigError, RunConfig, add_config_arguments
from core.errors import TrainingError
from core.io import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="hub:USER/NAME",
                   help="continue the run in output_dir (or pull its checkpoints from the Hub first)")
    return p


SUBCOMMANDS = {"trim-vocab": "train.vocab", "dapt": "train.dapt", "tfidf": "train.tfidf", "distill": "train.distill",
               "prune": "train.prune"}
WITH_CALLBACKS = ("dapt", "distill")
"""Subcommands that train on the engine (and take test callbacks)."""


def main(argv: list[str] | None = None, callbacks=None) -> int:
    """Run the command line; ``callbacks`` (a :class:`train.engine.Callbacks`) are handed to the training engine
    (tests inject a hard kill after a checkpoint this way)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return module.main(argv[1:], callbacks=callbacks) if argv[0] in WITH_CALLBACKS else module.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = RunConfig.from_yaml(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        resume = args.resume
        if isinstance(resume, str):
            if not resume.startswith("hub:"):
                raise InputError(f"--resume takes no value or hub:USER/NAME, got {resume!r}")
            from core.hub import pull_run

            pull_run(resume.removeprefix("hub:"), cfg.output_dir)
            resume = True
        from train.run import main as run_main

        run_main(cfg, resume=bool(resume), callbacks=callbacks)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # TrainingError and friends: one clear line, traceback on demand
        if isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
