"""``python -m train [cv]``: config-driven QLoRA multilabel training with cross-validation (the recipe:
:mod:`train.run`).

Usage:
    python -m train --config configs/gemma-3-270m/qlora.yaml [--set train.lr=1e-4 --set cv.folds=[0]] [--resume]
    torchrun --nproc_per_node 2 -m train --config configs/gemma-2-9b/qlora.yaml      # DDP, one 4-bit copy per GPU
    python -m train --config configs/gemma-3-270m/qlora.yaml --print-config          # resolved config, no training
    python -m train --config CFG --resume hub:USER/NAME      # pull the run's checkpoints from the Hub, then continue
    python -m train --config CFG --final [--resume]          # also the model to ship: every row, RUN/final/last

Exit status: 0 on success, 2 on bad input (config, data, paths), 1 when training fails.
"""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.config import RunConfig, add_config_arguments
from core.errors import InputError


def register(subparsers) -> None:
    # prog: the command is also what `python -m train --config X` (no command name) runs.
    p = subparsers.add_parser("cv", prog="python -m train", help="cross-validated training (the default command)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="hub:USER/NAME",
                   help="continue the run in output_dir (or pull its checkpoints from the Hub first)")
    add_final_argument(p)
    add_verbose_argument(p)
    p.set_defaults(func=run)


def add_final_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--final", action="store_true",
                   help="after the folds, also train the final model on every row (distilling: the unlabelled ones "
                        "too, fold-averaged teachers) with the folds' settings and epochs (cv.final; RUN/final/last, "
                        "its thresholds tuned on the out-of-fold probabilities); may be added on --resume: only the "
                        "final model then trains")


def final_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides of ``args.overrides``, then ``cv.final=true`` with ``--final``."""
    return [*args.overrides, *(["cv.final=true"] if args.final else [])]


def run(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_yaml(args.config, final_overrides(args))
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
    from train.run import main  # torch and transformers load here, not when the parser is built

    main(cfg, resume=bool(resume), callbacks=args.callbacks)
    return 0
