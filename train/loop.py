"""One cross-validation fold on the training engine (:mod:`train.engine`): length-grouped micro-batches in
token-budget pieces, the multilabel loss weighted by rows across ranks (torchrun), per-epoch evaluation with the
run's decoding, last / best adapters."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig
from core.data import collate
from core.errors import TrainingError
from core.io import atomic_path, write_json
from core.metrics import scores
from core.model import autocast, input_device, predict_probs, split_max_memory
from core.sets import SetDecoder, cascade_of, is_sets
from core.thresholds import ThresholdSpec, threshold
from train import checkpoint
from train.checkpoint import Progress
from train.data import batch_order, split_by_tokens
from train.engine import Callbacks, DistContext, Optimization, broadcast_trainable, run_epochs, step_seed
from train.loss import distill_loss, multilabel_loss, pos_weight_from_labels


@dataclass
class DistEnv(DistContext):
    """Where this process runs: rank/world size (torchrun), local rank and device."""

    local_rank: int = 0
    device: torch.device = torch.device("cpu")


@dataclass
class SoftTargets:
    """Distillation targets of one fold (:mod:`train.distill`): per-row teacher probabilities and which rows have
    labels, over the same rows as ``fit_fold``'s ``token_ids``."""

    soft: np.ndarray
    """rows x classes teacher probabilities; NaN on rows that are not trained on (the validation fold)."""
    labelled: np.ndarray
    """rows booleans: False for the unlabelled rows (soft term only)."""
    alpha: float
    """Weight of the hard-label term (see :func:`train.loss.distill_loss`)."""


def setup_dist(parallel: str) -> DistEnv:
    """Initialise torch.distributed when launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1:
        if parallel == "split":
            raise TrainingError("train.parallel=split spreads one model over the GPUs of one process; "
                                "launch it with plain `python -m train`, not torchrun")
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return DistEnv(torch.distributed.get_rank(), world, local_rank, device)
    return DistEnv(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))


def device_map_for(cfg: RunConfig, env: DistEnv) -> tuple:
    """(device_map, max_memory): one full copy per rank (DDP / single), or the layers split over all visible GPUs
    (model parallel) with ``train.split_gpu_memory_gib`` of each for weights."""
    n_gpus = torch.cuda.device_count()
    if cfg.train.parallel == "split" and n_gpus > 1:
        return "auto", split_max_memory(cfg.train.split_gpu_memory_gib, n_gpus)
    return {"": env.device}, None


def evaluate(probs: np.ndarray, labels: np.ndarray, decode: ThresholdSpec | SetDecoder) -> dict[str, float]:
    """Metrics at 0.5 (plain threshold), with the run's cascade (``decode``: the config's ``decode`` section) and,
    when ``decode`` is a :class:`core.sets.SetDecoder`, with set decoding (its cascade candidate is the cascade);
    flat keys like ``cascade/exact_match``, ``sets/exact_match``."""
    decodings = [("t0.5", threshold(probs, 0.5)), ("cascade", cascade_of(decode).decode(probs))]
    if is_sets(decode):
        decodings.append(("sets", decode.decode(probs)))
    out = {}
    for name, preds in decodings:
        for k, v in scores(labels, preds).items():
            out[f"{name}/{k}"] = v
    return out


def fold_decoding(cfg: RunConfig, decode: ThresholdSpec, labels: np.ndarray,
                  train_idx: np.ndarray) -> ThresholdSpec | SetDecoder:
    """The per-epoch decoding of a fold: the cascade, or with ``decode.strategy: sets`` a set decoder whose priors
    come from the fold's training rows only (default lambda / temperature / candidates)."""
    if cfg.decode.strategy == "sets":
        return SetDecoder.fit(labels[train_idx], decode.label_names, decode)
    return decode


def selection_key(cfg: RunConfig) -> str:
    """The metric ``keep: best`` maximises: exact match of the configured strategy."""
    return f"{'sets' if cfg.decode.strategy == 'sets' else 'cascade'}/exact_match"


def fit_fold(cfg: RunConfig, fold: int, model, tokenizer, dtype: torch.dtype, token_ids: list[list[int]],
             labels: np.ndarray, fold_of_row: np.ndarray, fold_dir: Path, env: DistEnv, save_adapter,
             log=print, decode: ThresholdSpec | None = None, fingerprint: str = "",
             callbacks: Callbacks | None = None, push=None, targets: SoftTargets | None = None) -> dict:
    """Train one fold (resuming from ``fold_dir/checkpoint`` if present); returns the fold's result.

    ``save_adapter(model, folder, extra)`` writes an adapter folder (see core.adapter). ``decode`` is the run's
    cascade (``ThresholdSpec.from_decode(label_names, cfg.decode)``); None: the config's steps with an argmax
    fallback (for callers without label names, e.g. benchmarks). With ``decode.strategy: sets`` each epoch also
    scores set decoding with priors from this fold's training rows (:func:`fold_decoding`). ``fingerprint``
    identifies the run a checkpoint belongs to (see :mod:`train.checkpoint`); ``push()`` (rank 0, after each checkpoint) sends it to the Hub.
    ``targets``: distillation (soft targets, labelled mask); rows with ``fold_of_row`` -1 (unlabelled) are trained
    on in every fold and never evaluated.
    """
    t = cfg.train
    if decode is None:
        d = cfg.decode
        decode = ThresholdSpec(tuple(map(str, range(labels.shape[1]))), d.start, d.stop, d.step, "argmax")
    device = input_device(model)
    train_idx = np.flatnonzero(fold_of_row != fold)
    val_idx = np.flatnonzero(fold_of_row == fold)
    labelled_train = train_idx if targets is None else train_idx[targets.labelled[train_idx]]
    decode = fold_decoding(cfg, decode, labels, labelled_train)  # set priors: this fold's labelled training rows
    key = selection_key(cfg)
    lengths = np.array([len(x) for x in token_ids])
    pos_weight = pos_weight_from_labels(labels[labelled_train], cfg.loss.pos_weight, cfg.loss.pos_weight_max)
    if targets is not None and not np.isfinite(targets.soft[train_idx]).all():
        raise TrainingError(f"fold {fold}: training rows without teacher targets")

    n_batches = math.ceil(len(train_idx) / t.micro_batch_size) // env.world_size
    if n_batches < 1:
        raise TrainingError(f"fold {fold}: {len(train_idx)} training rows are fewer than one micro-batch per rank")
    steps_per_epoch = math.ceil(n_batches / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.num_epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    opt = Optimization(model, cfg, device, dtype, total_steps)
    fingerprint = checkpoint.fingerprint(fingerprint, fold, env.world_size)
    ckpt = fold_dir / "checkpoint"
    resumed = checkpoint.exists(ckpt)
    if resumed:
        state = opt.load(ckpt, fingerprint)
        log(f"fold {fold}: resumed at epoch {state.epoch} step {state.step}/{total_steps}")
    else:
        state = Progress()
        broadcast_trainable(opt.params, env.world_size)  # ranks agree because rank 0 says so, not by equal seeds

    def save() -> None:
        opt.save(ckpt, state, fingerprint)
        if push is not None:
            push()

    step_rows: list[int] = []

    def epoch_steps(epoch: int) -> list:
        order = batch_order(lengths[train_idx], t.micro_batch_size, seed=t.seed * 1000 + epoch,
                            group_by_length=t.group_by_length)
        order = [train_idx[b] for b in order][:n_batches * env.world_size]
        # Optimizer step g uses micro-batches order[g*span:(g+1)*span] of all ranks together (rank r takes every
        # world_size-th): the same steps as one process with grad_accum_steps * world_size.
        span = t.grad_accum_steps * env.world_size
        step_rows[:] = [sum(len(b) for b in order[i:i + span]) for i in range(0, len(order), span)]
        order = order[env.rank::env.world_size]
        return [order[i:i + t.grad_accum_steps] for i in range(0, len(order), t.grad_accum_steps)]

    def train_step(g: int, micro_batches) -> float:
        rows_in_step = sum(len(b) for b in micro_batches)
        loss_sum = 0.0
        tokens_before = (state.real_tokens, state.padded_tokens)
        pieces = [p for rows in micro_batches for p in split_by_tokens(rows, lengths, t.max_tokens_per_micro_batch)]
        for rows in pieces:
            batch = collate([token_ids[i] for i in rows], tokenizer.pad_token_id, labels[rows])
            with autocast(device, dtype):
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            if targets is None:
                loss = multilabel_loss(logits, batch["labels"].to(logits.device), cfg.loss, pos_weight)
            else:
                loss = distill_loss(logits, batch["labels"], torch.as_tensor(targets.soft[rows]),
                                    torch.as_tensor(targets.labelled[rows]), targets.alpha, cfg.loss, pos_weight)
            # Weight each micro-batch (or piece of one) by its rows so a short one counts as much as its rows;
            # the all-reduce averages over ranks, so the gradient is the mean over the step's rows on all ranks.
            opt.backward(loss * (len(rows) * env.world_size / step_rows[g]))
            loss_sum += loss.item() * len(rows)
            state.real_tokens += int(batch["attention_mask"].sum())
            state.padded_tokens += batch["attention_mask"].numel()
        state.samples += step_rows[g]  # rows of all ranks
        # (end time, rows, real tokens, padded tokens) per optimizer step: benchmarks skip the warm-up steps.
        state.step_log.append((time.perf_counter(), rows_in_step, state.real_tokens - tokens_before[0],
                               state.padded_tokens - tokens_before[1]))
        return loss_sum / rows_in_step

    def end_epoch(epoch: int, done: bool) -> None:
        # End of epoch (or of max_steps): evaluate on the held-out fold, save last/best.
        if env.is_main and not len(val_idx):  # a final model (distill.final): nothing held out
            state.history.append({"epoch": epoch + 1, "step": state.step})
            save_adapter(model, fold_dir / "last", {"final": True, "epoch": epoch + 1})
        elif env.is_main:
            probs = predict_probs(model, [token_ids[i] for i in val_idx], tokenizer.pad_token_id,
                                  t.eval_batch_size, dtype, desc=f"fold {fold} eval")
            model.train()
            metrics = evaluate(probs, labels[val_idx], decode)
            row = {"epoch": epoch + 1, "step": state.step, **metrics}
            state.history.append(row)
            sets_em = f", {metrics['sets/exact_match']:.4f} sets" if "sets/exact_match" in metrics else ""
            log(f"fold {fold} epoch {epoch + 1}: exact-match {metrics['t0.5/exact_match']:.4f} @0.5, "
                f"{metrics['cascade/exact_match']:.4f} cascade{sets_em}; micro-F1 {metrics['cascade/micro_f1']:.4f} "
                f"cascade")
            save_adapter(model, fold_dir / "last", {"fold": fold, "epoch": epoch + 1, "metrics": metrics})
            save_npy(fold_dir / "val_probs_last.npy", probs)
            if state.best is None or metrics[key] > state.best.get(key, -np.inf):
                state.best = row
                save_adapter(model, fold_dir / "best", {"fold": fold, "epoch": epoch + 1, "metrics": metrics})
                save_npy(fold_dir / "val_probs_best.npy", probs)
        env.barrier()

    model.train()
    run_epochs(opt=opt, progress=state, num_epochs=t.num_epochs, total_steps=total_steps, epoch_steps=epoch_steps,
               train_step=train_step, end_epoch=end_epoch, save=save, checkpoint_last=True,
               save_every_steps=t.save_every_steps, guard_steps=t.nan_guard_steps, dtype=dtype, what=f"fold {fold}",
               seed_of_step=lambda step: step_seed(t.seed, fold, step, env.rank), dist=env,
               grad_accum_steps=t.grad_accum_steps, resumed=resumed, callbacks=callbacks,
               desc=f"fold {fold}")

    probs = np.load(fold_dir / f"val_probs_{t.keep}.npy") if env.is_main and len(val_idx) else None
    return {"fold": fold, "val_index": val_idx, "probs": probs, "history": state.history, "best": state.best,
            "steps": state.step, "samples": state.samples, "real_tokens": state.real_tokens,
            "padded_tokens": state.padded_tokens, "train_seconds": state.train_seconds,
            "step_log": state.step_log}


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_fold_metrics(fold_dir: Path, result: dict) -> None:
    skip = ("probs", "val_index", "step_log")
    write_json(fold_dir / "metrics.json", {k: v for k, v in result.items() if k not in skip})
