"""What experiment tracking costs per optimizer step: the same training with ``train.report_to: []`` and with
trackers (default ``[tensorboard]``), side by side in one process, plus the tracker's own calls timed alone.

Usage:
    python -m benchmarks.tracking --model embedded --steps 30 --repeats 2        # the real 270M on the DLS rows
    python -m benchmarks.tracking --model tiny-gemma3 --data data/sample_train.csv --steps 8 --warmup 2   # rehearsal

One model is loaded once (4-bit, the model's config, ``configs/gemma-3-270m/qlora.yaml`` for the 270M) and trained
by the toolkit's loop (:func:`train.run.fit`) for ``warmup + steps`` optimizer steps per measurement, the variants
alternating (A B, then B A, ...) so that drift of a shared CPU falls on both. A step's time is the time between the
ends of consecutive steps (everything the loop does: forward, backward, optimizer, the tracker's calls); the first
``warmup`` steps are left out. The model keeps training from one measurement to the next (weights don't change speed).
Then the tracker's per-step calls (:meth:`train.tracking.Tracker.log_step`, 4 scalars) are timed alone, 2000 times,
and its flush (at each checkpoint): the overhead that the side-by-side figures cannot resolve below their noise.

Prints ms/step of each variant (median and mean over the timed steps of all repeats), their ratio, and the tracker's
own cost in microseconds per step; ``--out FILE`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.shapes import CONFIGS, DLS, DLS_DATA, DLS_FALLBACK, build_shape, embedded_path, log


def load(model: str, root: Path) -> str:
    """A model folder: ``embedded`` (the real 270M), a shape of benchmarks.shapes (random weights), or a path."""
    if model == "embedded":
        return embedded_path(None)
    if model in CONFIGS:
        return build_shape(model, None, root)
    return model


def config(model_key: str, path: str, data: str, steps: int, report_to: list[str], sets: list[str]):
    from core.config import RunConfig

    over = [f"model.name_or_path={path}", f"data.train_csv={data}", "train.save_every_steps=0", "cv.folds=[0]",
            f"train.max_steps={steps}", "train.num_epochs=1", f"train.report_to={json.dumps(report_to)}",
            f"data.id_column={DLS_DATA['id_column']}", f"data.text_template={json.dumps(DLS_DATA['text_template'])}",
            f"data.label_prefix={DLS_DATA['label_prefix']}", f"decode.fallback=trend_id_res{DLS_FALLBACK}", *sets]
    return RunConfig.from_yaml(CONFIGS.get(model_key, CONFIGS["embedded"]), over)


def measure(args, work: Path) -> dict:
    import torch

    from core.data import read_csv, tokenize
    from core.model import load_classifier, load_tokenizer
    from train.callbacks import Callbacks
    from train.dist import DistEnv
    from train.lora import apply_lora
    from train.run import Fold, Rows, Run, fit

    path = load(args.model, work)
    total = args.warmup + args.steps
    base = config(args.model, path, args.data, total, [], args.set)
    ds = read_csv(base.data.train_csv, base.data)
    tok = load_tokenizer(path)
    ids = tokenize(ds.texts, tok, base.data.max_length)
    rows_needed = total * base.train.micro_batch_size * base.train.grad_accum_steps + 8
    if len(ids) < rows_needed:
        raise SystemExit(f"{args.data}: {len(ids)} rows, {total} steps need {rows_needed} (one epoch, no evaluation "
                         f"inside the timed steps)")
    # Speed only: train on every row but 8, which are the held-out fold evaluated once at the end.
    rows = Rows(ids, ds.labels, (np.arange(len(ids)) >= 8).astype(np.int64))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model, tok, dtype = load_classifier(path, ds.labels.shape[1], base.model, base.quantization, device, seed=42)
    model = apply_lora(model, base.lora, base.train.grad_checkpointing)
    log(f"model {args.model} ({path}), dtype {dtype}, {len(ids)} rows, {total} steps per measurement")

    variants = {"none": [], "+".join(args.trackers): args.trackers}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            cfg = config(args.model, path, args.data, total, variants[name], args.set)
            ends: list[float] = []
            cb = Callbacks(on_step=[lambda progress, loss, ends=ends: ends.append(time.perf_counter())])
            folder = work / f"run{r}-{name}" / "fold_0"
            t0 = time.perf_counter()
            fit(Run(cfg, DistEnv(device=device), callbacks=cb), rows, Fold.cv(0, rows, folder), model, tok, dtype,
                save=lambda *a: None)
            step_s = np.diff(ends[max(args.warmup - 1, 0):])  # steps warmup+1 .. total, each end minus the last
            times[name] += step_s.tolist()
            log(f"repeat {r + 1} {name}: {1000 * np.median(step_s):.1f} ms/step median over {len(step_s)} steps "
                f"({time.perf_counter() - t0:.0f} s with the evaluation)")
    out = {"model": args.model, "data": args.data, "device": torch.cuda.get_device_name(0)
           if torch.cuda.is_available() else "cpu", "dtype": str(dtype).removeprefix("torch."),
           "micro_batch_size": base.train.micro_batch_size, "repeats": args.repeats, "steps_timed": args.steps,
           "ms_per_step": {n: {"median": 1000 * statistics.median(v), "mean": 1000 * statistics.fmean(v)}
                           for n, v in times.items()}}
    names = list(variants)
    out["ratio_median"] = out["ms_per_step"][names[1]]["median"] / out["ms_per_step"][names[0]]["median"]
    out["ratio_mean"] = out["ms_per_step"][names[1]]["mean"] / out["ms_per_step"][names[0]]["mean"]
    out["tracker_calls"] = tracker_cost(base, args.trackers, work)
    return out


def tracker_cost(cfg, trackers: list[str], work: Path, n: int = 2000) -> dict:
    """The tracker's own time: ``n`` calls of log_step (one optimizer step's 4 scalars each), then one flush."""
    import dataclasses

    from train.tracking import Tracker, step_row

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, report_to=trackers))
    tracker = Tracker.start(cfg, work / "alone", "fold_0", 0)
    rows = [step_row(i + 1, 0.5 / (i + 1), 2e-4, 1.0, 16, 0.5) for i in range(n)]
    t0 = time.perf_counter()
    for row in rows:
        tracker.log_step(row)
    t1 = time.perf_counter()
    tracker.flush()
    t2 = time.perf_counter()
    tracker.close()
    return {"calls": n, "us_per_step": 1e6 * (t1 - t0) / n, "flush_ms": 1000 * (t2 - t1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded (default), a shape of benchmarks.shapes, or a path")
    p.add_argument("--data", default=DLS, help=f"labelled CSV with the DLS columns (default {DLS})")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per measurement (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="measurements of each variant, alternating (default 2)")
    p.add_argument("--trackers", default="tensorboard", help="report_to of the tracked variant, comma-separated")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    args.trackers = [t for t in args.trackers.split(",") if t]
    from train import tracking

    tracking.check(args.trackers)
    work = Path(tempfile.mkdtemp(prefix="qlml-bench-tracking."))
    try:
        res = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = list(res["ms_per_step"])
    print(f"{'report_to':<14}{'ms/step median':>16}{'ms/step mean':>14}")
    for n in names:
        print(f"{n:<14}{res['ms_per_step'][n]['median']:>16.1f}{res['ms_per_step'][n]['mean']:>14.1f}")
    c = res["tracker_calls"]
    print(f"ratio {names[1]} / none: {res['ratio_median']:.3f} (median), {res['ratio_mean']:.3f} (mean); "
          f"{res['repeats']} x {res['steps_timed']} steps each, {res['model']} on {res['device']} ({res['dtype']})")
    print(f"the tracker's own calls: {c['us_per_step']:.1f} us per step (log_step, {c['calls']} calls), "
          f"flush {c['flush_ms']:.1f} ms (once per checkpoint)")
    if args.out:
        from core.io import write_json

        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
