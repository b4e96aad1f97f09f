"""Training speed and memory: the reference notebook's recipe vs the toolkit's default path, side by side.

Usage (one GPU; each measurement runs in its own process so peak memory is clean):
    python -m benchmarks.runner --models embedded,gemma-2-9b,mistral-7b,gemma-2-27b --steps 30
    python -m benchmarks.runner --models gemma-2-9b --profiles toolkit-t4          # only the T4 (15 GiB, fp16) profile
    python -m benchmarks.runner --models gemma-2-27b --profiles toolkit-split      # per-GPU peaks of the 2x T4 split
    python -m benchmarks.runner --quality --epochs 1                                # exact match, fold 0, real 270M
    python -m benchmarks.runner --quality --epochs 1 --folds 0,1,2,3,4 --out-oof DIR # out-of-fold, all 5 folds

Recipes:
  reference   HF Trainer, micro-batch 2, grad-accum 2, fp16, LoRA r16 on q/k/v of the upper layers, gradient
              checkpointing via prepare_model_for_kbit_training, random batch order, pad to longest, 8-bit AdamW.
  toolkit     the toolkit's training loop with the model's config (configs/<model>/qlora.yaml).
  toolkit-t4  the same, fp16, with the process capped at a T4's 15 GiB (torch.cuda.set_per_process_memory_fraction).
  trainer-toolkit  HF Trainer given the toolkit config's settings (micro-batch, length-grouped batches, no gradient
              checkpointing nor fp32 upcast, same LoRA and optimizer): the gain of the settings vs that of the loop.
  toolkit-split  train.parallel=split (the 27B's T4 profile) measured on one GPU: the layers each of 2 T4s would
              hold (transformers' device_map="auto" placement, computed on the meta device) built as a model of
              their own and trained in the T4 profile, one process per device: the peak of each is that device's
              peak. The split runs its devices one after the other, so its samples/s is rows / sum of step times.
Models: ``embedded`` = real Gemma 3 270M; the others are random-weight checkpoints of the real shapes, built on the
GPU (weights don't change speed or memory). Token lengths are those of the DLS data under the Gemma tokenizer.
MFU estimate = 4 x non-embedding parameters x real tokens/s / peak dense TFLOP/s of the device (forward 2N +
backward through activations 2N; LoRA weight gradients and attention FLOPs ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import shapes
from benchmarks.measure import gpu_peak_gib, non_embedding_params, rss_peak_gib, summarise
from benchmarks.reference import run_reference, run_trainer_toolkit
from benchmarks.shapes import (
    CONFIG_OVERRIDES,
    CONFIGS,
    DLS,
    DLS_DATA,
    DLS_FALLBACK,
    SHAPES,
    build_shape,
    dls_tokens,
    embedded_path,
    log,
    part_lora_layers,
    split_plan,
)


def run_toolkit(path: str, model_key: str, ids, labels, steps: int, warmup: int, t4: bool,
                epochs: int | None = None, val=None, overrides: list[str] | None = None,
                layers: tuple[int, int] | None = None) -> dict:
    """The toolkit's loop; with ``layers``, on that part of the model only (one device's share of a split)."""
    import torch

    from core.config import RunConfig
    from core.model import load_classifier
    from train.dist import DistEnv
    from train.lora import apply_lora
    from train.run import Fold, Rows, Run, fit

    over = [f"model.name_or_path={path}", "train.save_every_steps=0", "cv.folds=[0]",
            *CONFIG_OVERRIDES.get(model_key, []), *(overrides or [])]
    if t4:
        over.append("model.dtype=float16")
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, 15 * 2**30 / total))
    if epochs:
        over.append(f"train.num_epochs={epochs}")
    else:
        over.append(f"train.max_steps={steps + warmup + 1}")
    upstream_lora = False
    if layers is not None:
        part = part_lora_layers(model_key, overrides or [], layers)
        if not part:
            raise RuntimeError(f"layers {layers[0]}-{layers[1] - 1} hold no LoRA layer: nothing to measure")
        over.append(f"lora.layers_to_transform={part}")
        upstream_lora = bool(part_lora_layers(model_key, overrides or [], (0, layers[0])))
    cfg = RunConfig.from_yaml(CONFIGS[model_key], over)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = DistEnv(device=device)
    model, tok, dtype = load_classifier(path, labels.shape[1], cfg.model, cfg.quantization, device, seed=42)
    n_params = non_embedding_params(model)
    model = apply_lora(model, cfg.lora, cfg.train.grad_checkpointing)
    if upstream_lora:
        # In the split, this part's input comes from LoRA layers on the device before: its gradient is computed.
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    if val is None:  # speed only: train on all rows, evaluate a token fold of 8 rows
        fold_of_row = (np.arange(len(ids)) >= 8).astype(np.int64)
        all_ids, all_labels = ids, labels
    else:
        all_ids, all_labels = ids + val[0], np.concatenate([labels, val[1]])
        fold_of_row = np.r_[np.ones(len(ids), dtype=np.int64), np.zeros(len(val[0]), dtype=np.int64)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = Rows(all_ids, all_labels, fold_of_row)
        res = fit(Run(cfg, env), rows, Fold.cv(0, rows, Path(tmp)), model, tok, dtype, save=lambda *a: None)
    out = {"recipe": "toolkit-t4" if t4 else "toolkit", "layers": layers, "peak_gib": gpu_peak_gib(),
           "rss_gib": rss_peak_gib(), "dtype": str(dtype),
           "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
           "max_tokens_per_micro_batch": cfg.train.max_tokens_per_micro_batch,
           "grad_checkpointing": cfg.train.grad_checkpointing,
           **summarise(res.step_log, warmup if not epochs else 1, n_params)}
    if val is not None:
        out["val_probs"] = res.probs.tolist()
    return out


def worker(args) -> None:
    from transformers import AutoConfig

    path = args.model_path
    ids, labels = dls_tokens(args.data, args.gguf, AutoConfig.from_pretrained(path).vocab_size)
    val = None
    if args.quality:
        from train.data import make_folds

        fold = make_folds(labels, 5, 42)
        tr, va = np.flatnonzero(fold != args.fold), np.flatnonzero(fold == args.fold)
        val = ([ids[i] for i in va], labels[va])
        ids, labels = [ids[i] for i in tr], labels[tr]
    else:
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(ids))
        ids, labels = [ids[i] for i in perm], labels[perm]
    if args.worker == "reference":
        out = run_reference(path, ids, labels, args.steps, args.warmup, args.epochs if args.quality else None, val)
    elif args.worker == "trainer-toolkit":
        out = run_trainer_toolkit(path, args.model, ids, labels, args.steps, args.warmup, args.set)
    elif args.worker.startswith("split-"):  # one device's part of train.parallel=split, in the T4 profile
        layers = tuple(int(x) for x in args.layers.split("-"))
        out = run_toolkit(path, args.model, ids, labels, args.steps, args.warmup, True, None, None, args.set,
                          layers=(layers[0], layers[1]))
        out["recipe"] = args.worker
    else:
        out = run_toolkit(path, args.model, ids, labels, args.steps, args.warmup, args.worker == "toolkit-t4",
                          args.epochs if args.quality else None, val, args.set)
    if val is not None:
        from core.metrics import scores
        from core.thresholds import cascade, threshold

        probs = np.asarray(out["val_probs"])
        out["val_t0.5"] = scores(val[1], threshold(probs))
        out["val_cascade"] = scores(val[1], cascade(probs, fallback=DLS_FALLBACK))
        out["fold"], out["val_rows"] = args.fold, va.tolist()
    out["model"] = args.model
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- orchestrator
def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def run_worker(args, model: str, recipe: str, path: str, fold: int, extra: list[str] | None = None,
               fields: dict | None = None) -> dict:
    """One measurement in its own process (clean peak memory); its RESULT line, or the error it ended with."""
    cmd = [sys.executable, "-m", "benchmarks.runner", "--worker", recipe, "--model", model, "--model-path", path,
           "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--epochs", str(args.epochs), "--fold", str(fold)] + (["--quality"] if args.quality else [])
    cmd += extra or []
    cmd += [x for s in args.set for x in ("--set", s)] + (["--gguf", args.gguf] if args.gguf else [])
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    cmd += ["--tokens", args.tokens] if args.tokens else []
    log(f"== {model} / {recipe}" + (f" / fold {fold}" if args.quality else ""))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout)
        line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
        if line is None:
            tail = proc.stderr.strip().splitlines()[-3:]
            res = {"model": model, "recipe": recipe, "error": " | ".join(tail) or f"exit {proc.returncode}"}
        else:
            res = json.loads(line[len("RESULT "):])
    except subprocess.TimeoutExpired:
        res = {"model": model, "recipe": recipe, "error": f"timed out after {args.timeout}s"}
    res["wall_s"] = round(time.time() - t0, 1)
    res.update(fields or {})
    log(json.dumps({k: v for k, v in res.items() if k not in ("val_probs", "val_rows")}))
    append_jsonl(args, res)
    return res


def append_jsonl(args, res: dict) -> None:
    """--jsonl: each measurement appended as one JSON line as soon as it is made (a run killed later keeps it)."""
    if not args.jsonl:
        return
    line = {"step": args.tag, **{k: v for k, v in res.items() if k not in ("val_probs", "val_rows")},
            "set": list(args.set), "steps": args.steps, "warmup": args.warmup}
    with open(args.jsonl, "a") as f:
        f.write(json.dumps(line) + "\n")


def run_split(args, model: str) -> list[dict]:
    """``train.parallel: split`` measured on one GPU: each device's part of the model (its layers, the embedding on
    the first, the head on the last) trained on its own in the T4 profile, so each peak is that device's peak."""
    plan = split_plan(model, args.split_devices, args.split_gib)
    log(f"{model} on {args.split_devices} x {args.split_gib:g} GiB: layers per device {plan}")
    out = []
    for d, (start, stop) in enumerate(plan):
        path = build_shape(model, args.gguf, Path(args.shapes_dir), layers=(start, stop))
        try:
            res = run_worker(args, model, f"split-{d}", path, 0, ["--layers", f"{start}-{stop}"],
                             fields={"layers": [start, stop], "split_parts": len(plan)})
        finally:
            shutil.rmtree(path, ignore_errors=True)  # 27B parts are ~30 GB each in bf16: don't fill the disk
        out.append(res)
    return out


def _fold_file(args, model: str, recipe: str, fold: int) -> Path | None:
    if not (args.quality and args.out_oof):
        return None
    return Path(args.out_oof) / "folds" / f"{model}_{recipe}_fold{fold}.json"


def _fold_settings(args) -> dict:
    return {"epochs": args.epochs, "data": str(Path(args.data).resolve()), "set": list(args.set)}


def keep_fold(args, res: dict) -> None:
    """--quality --out-oof: each finished fold of a recipe (its held-out probabilities too) is written as it ends,
    so that a run cut short (hours on a CPU) goes on where it stopped when started again with the same --out-oof."""
    path = _fold_file(args, res["model"], res["recipe"], res.get("fold", 0))
    if path is not None and "error" not in res:
        from core.io import write_json

        write_json(path, {"settings": _fold_settings(args), "result": res})


def kept_fold(args, model: str, recipe: str, fold: int) -> dict | None:
    """The result of a fold written by an earlier run with the same settings, else None (an error if the file was
    made with other settings: the out-of-fold scores would mix two experiments)."""
    path = _fold_file(args, model, recipe, fold)
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != _fold_settings(args):
        raise SystemExit(f"error: {path} was made with other settings ({saved['settings']} vs "
                         f"{_fold_settings(args)}); delete it or pick another --out-oof")
    log(f"== {model} / {recipe} / fold {fold}: kept from {path} (delete it to run it again)")
    return saved["result"]


def out_of_fold(args, results: list, models: list, profiles: list, folds: list) -> None:
    """Each recipe's held-out probabilities over all the folds run, scored together (and written with --out-oof)."""
    import pandas as pd

    from core.config import DataArgs
    from core.data import read_csv
    from core.io import write_probs, write_text
    from core.metrics import scores
    from core.thresholds import cascade, threshold
    from train.data import make_folds

    ds = read_csv(args.data, DataArgs(train_csv=args.data, **DLS_DATA))
    if args.out_oof:  # the split, as a run's folds.csv: `infer tune/blend --folds` use the same folds
        folds_csv = pd.DataFrame({"index": ds.ids, "fold": make_folds(ds.labels, 5, 42)}).to_csv(index=False)
        write_text(Path(args.out_oof) / "folds.csv", folds_csv)
    print(f"\nout of fold ({len(folds)} folds: {','.join(map(str, folds))}; {args.epochs} epoch(s), "
          f"same split and seed)")
    for m in models:
        for prof in profiles:
            runs = [r for r in results if r["model"] == m and r["recipe"] == prof and "error" not in r]
            if len(runs) != len(folds):
                print(f"{m:<12} {prof:<11} incomplete: {len(runs)} of {len(folds)} folds ran")
                continue
            rows = np.concatenate([r["val_rows"] for r in runs])
            probs = np.concatenate([np.asarray(r["val_probs"]) for r in runs])
            at5 = scores(ds.labels[rows], threshold(probs))
            cas = scores(ds.labels[rows], cascade(probs, fallback=DLS_FALLBACK))
            print(f"{m:<12} {prof:<11} {len(rows)} rows: exact match {at5['exact_match']:.4f} @0.5, "
                  f"{cas['exact_match']:.4f} cascade; micro-F1 {cas['micro_f1']:.4f}, macro-F1 {cas['macro_f1']:.4f}")
            if args.out_oof:
                order = np.argsort(rows)
                write_probs(Path(args.out_oof) / f"{m}_{prof}_oof.csv", ds.ids[rows[order]], probs[order],
                            ds.label_names, meta={"recipe": prof, "model": m, "folds": folds, "epochs": args.epochs,
                                                    "scores_t0.5": at5, "scores_cascade": cas})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="default: embedded,gemma-2-9b (--quality: embedded)")
    p.add_argument("--profiles", default="reference,toolkit,toolkit-t4")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--data", default=DLS)
    p.add_argument("--gguf", default=None, help="the Gemma 3 270M GGUF (default: the registry package)")
    p.add_argument("--tokenizer", default=None, help="folder with the Gemma tokenizer (default: the embedded model's)")
    p.add_argument("--shapes-dir", default=os.path.join(tempfile.gettempdir(), "qlml-bench-shapes"))
    p.add_argument("--quality", action="store_true", help="held-out accuracy, reference vs toolkit (real 270M)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--folds", default="0", help="--quality: folds of the 5-fold split to train and score")
    p.add_argument("--out-oof", default=None, help="--quality: write each recipe's out-of-fold probabilities here "
                                                   "(and each finished fold: run again to go on where it stopped)")
    p.add_argument("--split-devices", type=int, default=2, help="toolkit-split: number of GPUs to split over")
    p.add_argument("--split-gib", type=float, default=15.0, help="toolkit-split: memory of each GPU (T4: 15)")
    p.add_argument("--fold", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--layers", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--jsonl", default=None, help="append each result to this file as one JSON line when measured")
    p.add_argument("--tag", default=None, help="--jsonl: the step name written with each line")
    p.add_argument("--tokens", default=None, help="pre-tokenised prompts + labels (python -m benchmarks.shapes "
                                                  "tokens) instead of tokenising --data; shapes get a stand-in "
                                                  "tokenizer")
    p.add_argument("--set", action="append", default=[], help="override the toolkit config (KEY=VALUE)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per measurement")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes.TOKENIZER_DIR = args.tokenizer
    shapes.TOKENS = args.tokens
    if args.worker:
        worker(args)
        return 0

    import torch

    from core.config import RunConfig

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    models = (args.models or ("embedded" if args.quality else "embedded,gemma-2-9b")).split(",")
    folds = [int(f) for f in args.folds.split(",")] if args.quality else [0]
    profiles = ["reference", "toolkit"] if args.quality else args.profiles.split(",")
    results = []
    for m in models:
        # A model whose config splits it over GPUs (27B) does not fit one T4 by design: its T4 profile is the split.
        split = m in SHAPES and RunConfig.from_yaml(CONFIGS[m]).train.parallel == "split"
        profs = ["toolkit-split" if p == "toolkit-t4" and split else p for p in profiles]
        path = None
        for fold in folds:  # fold by fold: an interrupted --quality run still has its finished folds paired
            for prof in profs:
                if prof == "toolkit-split":
                    results.extend(run_split(args, m))
                    continue
                kept = kept_fold(args, m, prof, fold)
                if kept is not None:
                    results.append(kept)
                    continue
                if path is None:
                    path = embedded_path(args.gguf) if m == "embedded" else build_shape(m, args.gguf,
                                                                                       Path(args.shapes_dir))
                results.append(run_worker(args, m, prof, path, fold))
                keep_fold(args, results[-1])

    timing = f"{args.epochs} epoch(s) per fold" if args.quality else f"timed steps: {args.steps} after {args.warmup}"
    print(f"\ndevice: {device}   date: {time.strftime('%Y-%m-%d')}   {timing}")
    head = (f"{'model':<12} {'recipe':<15} {'samples/s':>9} {'tokens/s':>9} {'pad':>5} {'peak GiB':>8} {'RSS GiB':>7} "
            f"{'MFU':>6} {'x ref':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['model']:<12} {r['recipe']:<15} ERROR {r['error'][:150]}")
            continue
        ref = next((x for x in results if x["model"] == r["model"] and x["recipe"] == "reference"
                    and x.get("fold") == r.get("fold") and "error" not in x), None)
        part = r["recipe"].startswith("split-")  # a part's own speed is not the model's: see the split line
        ratio = r["samples_per_s"] / ref["samples_per_s"] if ref and not part else None
        print(f"{r['model']:<12} {r['recipe']:<15} {r['samples_per_s']:>9.2f} {r['real_tokens_per_s']:>9.0f} "
              f"{r['padding_fraction']:>5.2f} {fmt(r['peak_gib']):>8} {fmt(r.get('rss_gib')):>7} "
              f"{fmt(r['mfu'], '.2%'):>6} {fmt(ratio):>6}")
        if "val_cascade" in r:
            print(f"{'':<24} fold-{r['fold']} exact match: {r['val_t0.5']['exact_match']:.4f} @0.5, "
                  f"{r['val_cascade']['exact_match']:.4f} cascade; micro-F1 {r['val_cascade']['micro_f1']:.4f}")
    for m in models:
        parts = [r for r in results if r["model"] == m and r["recipe"].startswith("split-")]
        if parts and all("error" not in r for r in parts):
            ref = next((x for x in results if x["model"] == m and x["recipe"] == "reference" and "error" not in x),
                       None)
            rows = parts[0]["micro_batch_size"] * parts[0]["grad_accum_steps"]
            speed = rows / sum(r["s_per_step"] for r in parts)
            peaks = ", ".join(f"GPU {i} (layers {r['layers'][0]}-{r['layers'][1] - 1}"
                              f"{' + embedding' if i == 0 else ''}{' + head' if i == len(parts) - 1 else ''}) "
                              f"{fmt(r['peak_gib'])} GiB" for i, r in enumerate(parts))
            print(f"{m} split over {len(parts)} GPUs, T4 profile: peak {peaks}; {speed:.2f} samples/s run one "
                  f"device after the other" + (f" ({speed / ref['samples_per_s']:.2f}x reference)" if ref else ""))
    if args.quality and len(folds) > 1:
        out_of_fold(args, results, models, profiles, folds)
    for r in results:
        r.pop("val_probs", None)
        r.pop("val_rows", None)
    if args.out:
        from core.io import write_json

        write_json(args.out, {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                              "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
