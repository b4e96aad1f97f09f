"""Prediction throughput: batched (length-sorted, dynamic padding) vs one row at a time, same model, one process.

Usage:
    python -m benchmarks.predict --adapter adapters/gemma-3-270m/fold_0/last --input data/sample_test.csv
    python -m benchmarks.predict --adapter RUN --input test.csv --rows 2000 --batch-size 128 --json bench.json
    python -m benchmarks.predict --fresh-lora gemma-2-9b --base SHAPE_DIR --tokens .dev/dls/tokens.npz --rows 512

``--fresh-lora MODEL --base PATH`` benchmarks a fresh adapter (random LoRA weights, the config of MODEL, see
benchmarks.shapes.CONFIGS) on the base at PATH, e.g. a random-weight checkpoint of a real shape: speed does not
depend on the weights. ``--tokens FILE`` reads pre-tokenised prompts (python -m benchmarks.shapes tokens) instead
of ``--input``.

A run folder benchmarks its first fold's adapter. Both passes use the same pre-tokenised prompts (tokenisation
is not timed) after one warm-up batch, interleaved ``--repeats`` times (medians reported: shared machines are
noisy); the report includes the largest probability difference between the two
(padding must not change results beyond float noise).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fresh_adapter(base: str, model_key: str, label_names: list[str], folder, device=None, seed: int = 0) -> str:
    """An adapter folder for ``base`` with the LoRA of ``model_key``'s config and random LoRA / head weights."""
    import torch

    from benchmarks.shapes import CONFIG_OVERRIDES, CONFIGS
    from core.adapter import save_adapter
    from core.config import RunConfig
    from core.model import load_classifier
    from infer.predict import pick_device
    from train.lora import apply_lora

    cfg = RunConfig.from_yaml(CONFIGS[model_key], [f"model.name_or_path={base}", *CONFIG_OVERRIDES.get(model_key, [])])
    device = pick_device(device)
    model, tok, _ = load_classifier(base, len(label_names), cfg.model, cfg.quantization, device, seed=seed)
    model = apply_lora(model, cfg.lora, False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero (the adapter would be a no-op): give it weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    save_adapter(model, tok, Path(folder), cfg, label_names, {}, {"fresh_lora": True})
    del model
    gc.collect()
    if device.type == "cuda":  # the benchmark loads the base again
        torch.cuda.empty_cache()
    return str(folder)


def bench(adapter: str, input_csv: str | None, rows: int | None = None, batch_size: int = 64, device=None,
          repeats: int = 3, log=print, token_ids: list[list[int]] | None = None) -> dict:
    import torch

    from core.data import read_csv
    from core.errors import InputError
    from core.model import autocast
    from infer.predict import collect, load_refs

    if repeats < 1 or batch_size < 1:
        raise InputError(f"--repeats and --batch-size must be >= 1, got {repeats} and {batch_size}")
    refs = collect([adapter])[:1]
    if token_ids is None:
        ds = read_csv(input_csv, refs[0].cfg.data, labelled=False)
        texts = ds.texts[:rows] if rows else ds.texts
    t0 = time.perf_counter()
    p = load_refs(refs, device=device)
    load_s = time.perf_counter() - t0
    token_ids = p.token_ids(texts) if token_ids is None else token_ids[:rows] if rows else token_ids
    n = len(token_ids)

    p.predict_token_ids(token_ids[:batch_size], 0, batch_size)  # warm-up (kernels, allocator)
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    model, device_ = p.model, p.device

    def one_at_a_time() -> np.ndarray:
        out = np.zeros((n, len(p.label_names)))
        with torch.no_grad():
            for i, ids in enumerate(token_ids):
                x = torch.tensor([ids], dtype=torch.long, device=device_)
                with autocast(device_, p.dtype):
                    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
                out[i] = torch.sigmoid(logits.float())[0].cpu().numpy()
        return out

    times = {"batched": [], "one_at_a_time": []}
    for _ in range(repeats):  # interleaved, so that a slow phase of a shared machine hits both alike
        for name, fn in [("batched", lambda: p.predict_token_ids(token_ids, 0, batch_size)),
                         ("one_at_a_time", one_at_a_time)]:
            sync()
            t0 = time.perf_counter()
            probs = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            if name == "batched":
                batched = probs
            else:
                single = probs
    lengths = np.array([len(t) for t in token_ids])
    result = {
        "adapter": str(refs[0].folder), "input": input_csv, "rows": n, "batch_size": batch_size,
        "device": str(device_), "cuda_device": torch.cuda.get_device_name(0) if device_.type == "cuda" else None,
        "threads": torch.get_num_threads(), "dtype": str(p.dtype).removeprefix("torch."),
        "tokens": {"median": int(np.median(lengths)), "max": int(lengths.max())}, "load_seconds": round(load_s, 2),
        "repeats": repeats,
        **{name: {"seconds": [round(t, 3) for t in ts], "rows_per_s": round(n / float(np.median(ts)), 2),
                  "best_rows_per_s": round(n / min(ts), 2)} for name, ts in times.items()},
        "speedup": round(float(np.median(times["one_at_a_time"]) / np.median(times["batched"])), 2),
        "max_abs_diff": float(np.abs(batched - single).max()),
    }
    log(f"{n} rows ({result['device']}, {result['dtype']}, {result['threads']} threads, tokens median "
        f"{result['tokens']['median']} max {result['tokens']['max']}):")
    for name, label in [("batched", f"batched (batch {batch_size}, length-sorted)"),
                        ("one_at_a_time", "one row at a time")]:
        r = result[name]
        log(f"  {label:36s} {r['rows_per_s']:8.1f} rows/s (median of {repeats}; best {r['best_rows_per_s']:.1f})")
    log(f"  speedup x{result['speedup']:.2f}; max |p_batched - p_single| = {result['max_abs_diff']:.2e}")
    p.close()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", help="adapter folder, run folder (first fold) or cached Hub id")
    ap.add_argument("--fresh-lora", metavar="MODEL", help="instead of --adapter: a random LoRA of MODEL's config "
                                                          "(benchmarks.shapes.CONFIGS) on --base")
    ap.add_argument("--base", help="--fresh-lora: the base model folder (e.g. a random-weight shape)")
    ap.add_argument("--input", help="CSV with the id column and the template's columns")
    ap.add_argument("--tokens", help="instead of --input: pre-tokenised prompts (python -m benchmarks.shapes tokens)")
    ap.add_argument("--rows", type=int, help="use the first N rows (default all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each (median reported)")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--jsonl", help="append the result to this file as one JSON line")
    ap.add_argument("--tag", help="--jsonl: the step name written with the line")
    args = ap.parse_args(argv)
    if (args.adapter is None) == (args.fresh_lora is None) or (args.fresh_lora and not (args.base and args.tokens)):
        ap.error("give --adapter, or --fresh-lora with --base and --tokens (its labels name the head's outputs)")
    if (args.input is None) == (args.tokens is None):
        ap.error("give --input or --tokens")
    from core.errors import InputError
    from core.io import write_json

    try:
        with tempfile.TemporaryDirectory() as tmp:
            ids = names = None
            if args.tokens:
                from benchmarks.shapes import read_tokens

                ids, _, names = read_tokens(args.tokens)
            adapter = args.adapter
            if args.fresh_lora:
                adapter = fresh_adapter(args.base, args.fresh_lora, names, Path(tmp) / "adapter", args.device)
            result = bench(adapter, args.input, args.rows, args.batch_size, args.device, args.repeats,
                           token_ids=ids)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            line = {"step": args.tag, "recipe": "predict", "model": args.fresh_lora or adapter, **result}
            f.write(json.dumps(line) + "\n")
    if args.json:
        write_json(args.json, result)
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
