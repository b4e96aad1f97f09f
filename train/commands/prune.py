"""``python -m train prune``: drop decoder layers / MLP channels by importance (the method: :mod:`train.prune`)."""

from __future__ import annotations

import argparse
import json

from core.cli import add_verbose_argument, module_doc
from core.config import RunConfig, add_config_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="drop decoder layers / MLP channels by importance",
                              description=module_doc("train.prune"), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--model", help="model folder or Hub id (model.name_or_path); default: the config's model")
    p.add_argument("--keep-layers", type=int, required=True, help="decoder layers to keep (the most influential)")
    p.add_argument("--mlp-keep", type=float, help="fraction of MLP intermediate channels to keep (Taylor importance)")
    p.add_argument("--data", required=True, help="CSV whose prompts (data.text_template) measure importance")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--max-rows", type=int, default=256, help="prompts used for the measurements")
    p.add_argument("--batch-size", type=int, default=8)
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.model:
        overrides += [f"model.name_or_path={json.dumps(args.model)}", "model.gguf_file=null"]
    cfg = RunConfig.from_yaml(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from train.prune import prune

    prune(cfg, args.data, args.out, args.keep_layers, args.mlp_keep, args.max_rows, args.batch_size)
    return 0
