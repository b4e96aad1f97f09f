"""``python -m train dapt``: domain-adaptive pretraining (DAPT; the recipe: :mod:`train.dapt`): continue pretraining
the base model with a LoRA adapter on the causal-LM objective (next-token cross-entropy) over unlabelled in-domain
text, then start classification fine-tuning from it.

Usage:
    python -m train dapt --config configs/gemma-3-270m/dapt.yaml --corpus ../shared/data/dls/test.csv [--resume]
    python -m train dapt --corpus a.csv,b.csv --out adapters/dapt --set train.max_steps=100 --eval-rows 256
    python -m train --config configs/gemma-3-270m/qlora.yaml --set lora.init_adapter=adapters/dapt-gemma-3-270m

The corpus rows are formatted with ``data.text_template`` (what the classifier later sees; only the template's
columns are needed, labels and ids are ignored) and truncated to ``data.max_length`` tokens. The model, quantization
and lora sections are those of classification training (the classifier's ``lora`` section must match the adapter:
r, alpha, modules, layers), and of the train section DAPT uses lr, num_epochs, micro_batch_size, grad_accum_steps,
max_steps, scheduler, warmup_ratio, weight_decay, max_grad_norm, optimizer, group_by_length, grad_checkpointing,
save_every_steps, nan_guard_steps, eval_batch_size and seed. The output folder (``--out``, default the config's
``output_dir``) holds resumable checkpoints while the run goes on and, once it finishes, the LoRA adapter
(``adapter_model.safetensors``), the tokenizer, ``run_config.yaml`` and ``dapt_info.json`` (corpus, steps, losses,
versions). ``--eval-rows N`` holds N corpus rows out of training and reports their loss before and after.

Exit status: 0 on success, 2 on bad input (config, corpus, paths), 1 when training fails.
"""

from __future__ import annotations

import argparse
import dataclasses

from core.cli import add_verbose_argument
from core.config import RunConfig, add_config_arguments
from train.data import split_paths


def register(subparsers) -> None:
    p = subparsers.add_parser("dapt", help="domain-adaptive pretraining on unlabelled text", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--corpus", action="append", default=[], metavar="CSV[,CSV...]",
                   help="unlabelled CSV file(s) with the template's columns (repeatable, or comma-separated)")
    p.add_argument("--out", help="output folder (checkpoints, then the adapter); default: the config's output_dir")
    p.add_argument("--eval-rows", type=int, default=0, metavar="N",
                   help="hold N corpus rows out of training and report their loss before and after (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    out = args.out or cfg.output_dir
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from train import dapt  # torch and transformers load here, not when the parser is built

    dapt.main(cfg, split_paths(args.corpus), out, resume=args.resume, eval_rows=args.eval_rows,
              callbacks=args.callbacks)
    return 0
