"""Domain-adaptive pretraining (DAPT), the recipe behind ``python -m train dapt``: continue pretraining the base model
with a LoRA adapter on the causal-LM objective (next-token cross-entropy, :func:`train.loss.lm_loss_sum`) over
unlabelled in-domain text, then start classification fine-tuning from it (``lora.init_adapter``).

Read top to bottom, :func:`main` validates the corpus and the output folder, tokenizes and holds ``eval_rows`` rows
out, loads the 4-bit causal LM with a fresh LoRA adapter, runs the step loop (batch, forward, loss, backward, clip +
optimizer step + LR schedule, checkpoint) and writes the adapter folder, which replaces the checkpoint (with the
loss curve, ``curves.png``, and the trackers' logs of ``train.report_to``, ``logs/``: :mod:`train.tracking`). The
command line and what each setting does: :mod:`train.commands.dapt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.adapter import base_model_id
from core.config import RunConfig
from core.data import collate, tokenize
from core.errors import ConfigError, InputError
from core.io import atomic_dir, versions, write_json, write_text
from core.model import load_causal_lm, load_tokenizer, resolve_model_path
from train import checkpoint, curves, tracking
from train.callbacks import Callbacks
from train.checkpoint import Progress, step_seed
from train.data import batch_order, rank_steps, read_corpus
from train.dist import check_finite
from train.lora import apply_lora, count_parameters
from train.loss import corpus_loss, lm_loss_sum
from train.optim import Optimization

logger = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoint")
RUN_FILE = "dapt_run.json"
INFO_FILE = "dapt_info.json"

# Settings that do not change what a DAPT run computes: a resumed run may differ in these.
_RESUME_FREE = ("output_dir", "data.train_csv", "data.train_labels_csv", "data.id_column", "data.label_prefix",
                "data.label_columns", "data.label_names_csv", "model.num_labels", "lora.init_adapter", "loss.",
                "cv.", "hub.", "distill.", "train.head_lr", "train.save_every_steps", "train.keep",
                "train.parallel", "train.eval_batch_size", "train.nan_guard_steps", "train.report_to")


@dataclass
class DaptProgress(Progress):
    """Where a DAPT run is (saved with every checkpoint)."""

    real_tokens: int = 0
    """Target tokens trained on."""
    losses: list = field(default_factory=list)
    """Training loss per optimizer step."""
    eval_loss_start: float | None = None
    """The held-out rows' loss before training."""


def check_out_dir(out: Path, resume: bool) -> bool:
    """Refuse to mix runs; returns True when ``out`` already holds the finished adapter (and ``resume`` is set)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    used = out.is_dir() and any(out.iterdir())
    finished = (out / INFO_FILE).is_file()
    if used and not resume:
        what = "a finished DAPT adapter" if finished else "a run"
        raise InputError(f"--out {out} already holds {what}; pass --resume to continue it, or choose another --out")
    if used and not (finished or (out / RUN_FILE).is_file() or checkpoint.exists(out / CHECKPOINT)):
        # The finished adapter replaces the folder: never a folder holding something else.
        raise InputError(f"--out {out} is not empty and holds no DAPT run to resume; choose another --out")
    return finished


def check_resume(out: Path, run_info: dict) -> None:
    """A resumed run must compute what the run in ``out`` computes: the same corpus rows and held-out rows, and no
    changed setting outside :data:`_RESUME_FREE` (each refused one named, old -> new)."""
    saved = json.loads((out / RUN_FILE).read_text())
    refused, _ = checkpoint.changes(RunConfig.from_dict(saved["config"]).to_dict(), run_info["config"], _RESUME_FREE)
    if refused:
        raise InputError(f"{out / RUN_FILE}: cannot resume: these settings change what the run computes: "
                         f"{checkpoint.describe(refused)} (put them back, or choose another --out)")
    if saved["fingerprint"] != run_info["fingerprint"] or saved["eval_rows"] != run_info["eval_rows"]:
        raise InputError(f"{out / RUN_FILE}: the corpus, data.text_template, data.max_length or --eval-rows "
                         f"changed since this run started (corpus then: {[f['path'] for f in saved['corpus']]})")


def main(cfg: RunConfig, corpus_paths: list[str], out: str | Path, resume: bool = False, eval_rows: int = 0,
         callbacks: Callbacks | None = None) -> dict:
    """Run DAPT (resuming from ``out/checkpoint`` with ``resume``); returns the contents of ``dapt_info.json``.

    An input error found after ``out`` was created removes it again if this call created it and no checkpoint was
    written, so that fixing the input and running the same command again works without ``--resume``.
    """
    out = Path(out)
    existed = out.exists()
    try:
        return train_dapt(cfg, corpus_paths, out, resume, eval_rows, callbacks or Callbacks())
    except (ConfigError, InputError):
        if not existed and out.is_dir() and not checkpoint.exists(out / CHECKPOINT):
            shutil.rmtree(out, ignore_errors=True)
        raise


def train_dapt(cfg: RunConfig, corpus_paths: list[str], out: Path, resume: bool, eval_rows: int,
               callbacks: Callbacks) -> dict:
    """The recipe (see the module doc); :func:`main` wraps it."""
    t_start = time.time()
    t = cfg.train
    # 1. Validate inputs before anything is written.
    tracking.check(cfg.train.report_to)
    if cfg.lora.init_adapter:
        raise ConfigError("lora.init_adapter is for classification training (python -m train); DAPT starts "
                          "from a fresh LoRA adapter: unset it (--set lora.init_adapter=)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("python -m train dapt runs in one process (use several GPUs with train.parallel=split), "
                         "not under torchrun")
    if eval_rows < 0:
        raise InputError(f"--eval-rows must be >= 0, got {eval_rows}")
    corpus = read_corpus(corpus_paths, cfg.data.text_template)
    if check_out_dir(out, resume):
        info = json.loads((out / INFO_FILE).read_text())
        logger.info(f"dapt: {out} already holds the finished adapter ({info['steps']} steps); nothing to do")
        return info
    model_path = resolve_model_path(cfg.model, log=logger.info)
    tokenizer = load_tokenizer(model_path)
    token_ids = [ids for ids in tokenize(corpus.texts, tokenizer, cfg.data.max_length) if len(ids) >= 2]
    if not token_ids:
        raise InputError(f"the corpus ({', '.join(corpus_paths)}) has no row of 2 tokens or more")
    rng = np.random.default_rng(t.seed)
    perm = rng.permutation(len(token_ids))
    if eval_rows >= len(token_ids):
        raise InputError(f"--eval-rows {eval_rows} leaves no training rows of the corpus's {len(token_ids)}")
    eval_ids = [token_ids[i] for i in sorted(perm[:eval_rows])]
    train_ids = [token_ids[i] for i in sorted(perm[eval_rows:])]
    lengths = np.array([len(x) for x in train_ids])
    n_batches = math.ceil(len(train_ids) / t.micro_batch_size)
    steps_per_epoch = math.ceil(n_batches / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.num_epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    fingerprint = hashlib.sha256(json.dumps([train_ids, eval_ids]).encode()).hexdigest()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    saved = json.loads((out / RUN_FILE).read_text()) if resume and (out / RUN_FILE).is_file() else None
    # A run file from before the dtype was recorded: resolved now, as such runs always were on resume.
    run_info = {"config": cfg.to_dict(), "corpus": corpus.files, "eval_rows": eval_rows, "fingerprint": fingerprint,
                "dtype": checkpoint.kept_dtype(cfg.model, device, saved if saved and "dtype" in saved else None)}
    if saved is not None:
        check_resume(out, run_info)
    logger.info(f"dapt: {len(train_ids)} training rows ({int(lengths.sum())} tokens, median "
                f"{int(np.median(lengths))}, max {lengths.max()}, max_length {cfg.data.max_length}) from "
                f"{', '.join(corpus_paths)}; {eval_rows} held out; {total_steps} optimizer steps")

    # 2. The model: 4-bit causal LM + a fresh (seeded) LoRA adapter.
    device_map = "auto" if t.parallel == "split" and torch.cuda.device_count() > 1 else None
    margs = replace(cfg.model, dtype=run_info["dtype"])  # auto resolved once, when the run started
    model, tok, dtype = load_causal_lm(model_path, margs, cfg.quantization, device, device_map=device_map)
    torch.manual_seed(t.seed)  # LoRA init
    model = apply_lora(model, cfg.lora, t.grad_checkpointing, task="causal_lm")
    params = count_parameters(model)
    logger.info(f"dapt: {params['trainable']:,} trainable of {params['total']:,} parameters, "
                f"dtype {str(dtype).removeprefix('torch.')}, device {device}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_FILE).is_file():
        write_json(out / RUN_FILE, run_info)

    # 3. Optimizer and schedule, restored from the checkpoint if there is one.
    opt = Optimization(model, cfg, device, dtype, total_steps)
    ckpt = out / CHECKPOINT
    fp = checkpoint.fingerprint(fingerprint, checkpoint.result_settings(cfg.to_dict(), _RESUME_FREE))
    resumed = checkpoint.exists(ckpt)
    if resumed:
        state = opt.load(ckpt, fp, DaptProgress)
        logger.info(f"dapt: resumed at epoch {state.epoch} step {state.step}/{total_steps}")
    else:
        state = DaptProgress()
        if eval_ids:
            state.eval_loss_start = corpus_loss(model, eval_ids, tok.pad_token_id, t.eval_batch_size, dtype)
            logger.info(f"dapt: held-out loss before training {state.eval_loss_start:.4f}")
    tracker = tracking.Tracker.start(cfg, out, "", state.step, metrics=("eval/loss",))  # out/logs
    if not resumed and state.eval_loss_start is not None:
        tracker.log_eval(0, {"loss": state.eval_loss_start})

    def save_checkpoint() -> None:
        opt.save(ckpt, state, fp)
        tracker.flush()
        for cb in callbacks.on_checkpoint:
            cb(state, resumed)

    # 4. The step loop (a resumed run skips the optimizer steps its checkpoint holds).
    model.train()
    done = state.step >= total_steps
    for epoch in range(state.epoch, t.num_epochs):
        if done:
            break
        batches = batch_order(lengths, t.micro_batch_size, seed=t.seed * 1000 + epoch,
                              group_by_length=t.group_by_length)
        steps, _ = rank_steps(batches, t.grad_accum_steps, rank=0, world_size=1)
        first = state.batch // t.grad_accum_steps
        bar = tqdm(total=min(len(steps), first + total_steps - state.step), initial=first,
                   desc=f"dapt epoch {epoch + 1}/{t.num_epochs}", file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        for g in range(first, len(steps)):
            t_step = time.perf_counter()
            torch.manual_seed(step_seed(t.seed, 0, state.step, 0))  # dropout: reproducible after a resume
            # Forward + backward of each micro-batch: the summed next-token loss, over the step's target tokens.
            step_tokens = sum(int(lengths[r] - 1) for rows in steps[g] for r in rows)
            loss_sum = 0.0
            for rows in steps[g]:
                batch = collate([train_ids[r] for r in rows], tok.pad_token_id)
                loss, _ = lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], dtype)
                opt.backward(loss / step_tokens)  # mean over the step's tokens
                loss_sum += loss.item()
            state.real_tokens += step_tokens
            mean_loss = loss_sum / step_tokens
            state.losses.append(mean_loss)
            # Optimizer step: unscale, clip, step, LR schedule, zero the gradients.
            grad_norm = opt.step()
            state.step += 1
            state.batch = (g + 1) * t.grad_accum_steps
            tracker.log_step(tracking.step_row(state.step, mean_loss, opt.lr, grad_norm,
                                               sum(len(rows) for rows in steps[g]), time.perf_counter() - t_step))
            for cb in callbacks.on_step:
                cb(state, mean_loss)
            check_finite(mean_loss, state.step, t.nan_guard_steps, dtype, "dapt")
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{opt.lr:.2e}", gnorm=f"{grad_norm:.2f}")
            if state.step >= total_steps:
                done = True
                break
            if t.save_every_steps and state.step % t.save_every_steps == 0:
                state.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint()
        bar.close()
        state.train_seconds += time.perf_counter() - t0
        if not done:  # after the last step the finished adapter replaces the checkpoint instead
            state.epoch, state.batch = epoch + 1, 0
            save_checkpoint()

    # 5. The adapter folder, atomically (it replaces the checkpoint).
    eval_end = corpus_loss(model, eval_ids, tok.pad_token_id, t.eval_batch_size, dtype) if eval_ids else None
    if eval_end is not None:
        tracker.log_eval(state.step, {"loss": eval_end})
    tracker.close()
    losses = state.losses
    tail = losses[-max(1, len(losses) // 10):]
    info = {
        "kind": "dapt", "base_model": base_model_id(cfg), "model": cfg.model.name_or_path, "corpus": corpus.files,
        "rows": len(train_ids), "eval_rows": len(eval_ids), "tokens_seen": state.real_tokens,
        "steps": state.step, "steps_per_epoch": steps_per_epoch,
        "epochs": round(state.step / steps_per_epoch, 3),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "mean_loss": float(np.mean(losses)) if losses else None,
        "mean_loss_last_10pct": float(np.mean(tail)) if losses else None,
        "eval_loss_start": state.eval_loss_start, "eval_loss_end": eval_end,
        "train_seconds": round(state.train_seconds, 2),
        "seconds_per_step": round(state.train_seconds / state.step, 3) if state.step else None,
        "wall_seconds_this_call": round(time.time() - t_start, 1),
        "parameters": params, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "loss_history": [round(x, 5) for x in losses], "versions": versions(),
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_text(tmp / "run_config.yaml", cfg.to_yaml())
        write_json(tmp / INFO_FILE, info)
        if (out / tracking.LOGS).is_dir():  # the trackers' logs stay in the adapter folder that replaces out
            shutil.copytree(out / tracking.LOGS, tmp / tracking.LOGS)
        if losses:
            curves.plot_dapt(losses, tmp / curves.CURVES_FILE, f"DAPT {out.resolve().name}: {state.step} steps",
                             state.eval_loss_start, eval_end)
    msg = (f"dapt: {state.step} steps, loss {info['first_loss']:.4f} (first step) -> "
           f"{info['mean_loss_last_10pct']:.4f} (mean of the last {len(tail)}), "
           f"{info['seconds_per_step']} s/step")
    if eval_end is not None:
        msg += f"; held-out loss {state.eval_loss_start:.4f} -> {eval_end:.4f}"
    logger.info(msg)
    logger.info(f"wrote {out}: start classification training from it with --set lora.init_adapter={out}")
    return info

