"""The training loop of one fold: length-grouped micro-batches, gradient accumulation, AMP, resumable checkpoints,
per-epoch evaluation, data-parallel gradient all-reduce across ranks (torchrun), and batched prediction."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.config import RunConfig
from core.data import collate
from core.errors import TrainingError
from core.io import atomic_path, write_json
from core.metrics import scores
from core.model import autocast, input_device, predict_probs
from core.thresholds import ThresholdSpec, threshold
from train.data import batch_order, split_by_tokens
from train.loss import multilabel_loss, pos_weight_from_labels


@dataclass
class DistEnv:
    """Where this process runs: rank/world size (torchrun) and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


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


def device_map_for(cfg: RunConfig, env: DistEnv):
    """One full copy per rank (DDP / single) or the layers split over all visible GPUs (model parallel)."""
    if cfg.train.parallel == "split" and torch.cuda.device_count() > 1:
        return "auto"
    return {"": env.device}


def step_seed(seed: int, fold: int, step: int, rank: int) -> int:
    """A seed per (fold, optimizer step, rank): dropout is reproducible after a resume without saved RNG state."""
    return int(np.random.SeedSequence([seed, fold, step, rank]).generate_state(1)[0])


def build_optimizer(model, cfg: RunConfig, device: torch.device):
    t = cfg.train
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "score" not in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    groups = [{"params": lora, "lr": t.lr}, {"params": head, "lr": t.head_lr or t.lr}]
    name = t.optimizer
    if name == "auto":
        name = "adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=device.type == "cuda")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, weight_decay=t.weight_decay)


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = int(round(cfg.train.warmup_ratio * total_steps))
    if cfg.train.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if cfg.train.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


class Optimization:
    """Optimizer, LR schedule and fp16 grad scaler of one training run (a fold, or DAPT), with the checkpoint that
    makes it resumable: trainable weights + these three + the caller's progress ``state``, written atomically."""

    def __init__(self, model, cfg: RunConfig, device: torch.device, dtype: torch.dtype, total_steps: int):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg, device)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
        self.max_grad_norm = cfg.train.max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        """Unscale, clip, step optimizer + schedule, zero the gradients; returns the gradient norm."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, state: dict) -> None:
        blob = {"trainable": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "state": state}
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)

    def load(self, path: Path) -> dict:
        """Restore everything saved by :meth:`save`; returns the saved progress state."""
        saved = torch.load(path, map_location="cpu", weights_only=False)
        load_trainable_state(self.model, saved["trainable"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        return saved["state"]


def check_finite(loss: float, step: int, guard_steps: int, dtype: torch.dtype, what: str) -> None:
    """The NaN/inf guard of the first ``guard_steps`` optimizer steps, with what to change."""
    if step <= guard_steps and not math.isfinite(loss):
        hint = (" fp16 overflows easily with Gemma: use a bf16 GPU, model.dtype=float32, or a lower train.lr"
                if dtype == torch.float16 else " lower train.lr or check the data")
        raise TrainingError(f"{what}: loss is {loss} at optimizer step {step} "
                            f"(dtype {str(dtype).removeprefix('torch.')}).{hint}")


def kill_for_tests(resumed: bool, step: int) -> None:
    """Test hook (QLML_TEST_KILL_AT_STEP=N): a hard kill right after the first checkpoint at step >= N, never in a
    resumed run, so that tests can prove a killed-and-resumed run ends where an uninterrupted one does."""
    kill_at = os.environ.get("QLML_TEST_KILL_AT_STEP")
    if kill_at and not resumed and step >= int(kill_at):
        os._exit(137)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise TrainingError(f"checkpoint does not match the model: missing {missing[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


def allreduce_grads(params: list[torch.Tensor], world_size: int) -> None:
    """Average gradients across ranks in one flat buffer (LoRA + head: a few MB)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(p.dtype)
        offset += n


def evaluate(probs: np.ndarray, labels: np.ndarray, decode: ThresholdSpec) -> dict[str, float]:
    """Metrics at 0.5 (plain threshold) and with the run's cascade (``decode``: the config's ``decode`` section);
    flat keys like ``cascade/exact_match``."""
    out = {}
    for name, preds in [("t0.5", threshold(probs, 0.5)), ("cascade", decode.decode(probs))]:
        for k, v in scores(labels, preds).items():
            out[f"{name}/{k}"] = v
    return out


def fit_fold(cfg: RunConfig, fold: int, model, tokenizer, dtype: torch.dtype, token_ids: list[list[int]],
             labels: np.ndarray, fold_of_row: np.ndarray, fold_dir: Path, env: DistEnv, save_adapter,
             log=print, decode: ThresholdSpec | None = None) -> dict:
    """Train one fold (resuming from ``fold_dir/checkpoint`` if present); returns the fold's result.

    ``save_adapter(model, folder, extra)`` writes an adapter folder (see core.adapter). ``decode`` is the run's
    cascade (``ThresholdSpec.from_decode(label_names, cfg.decode)``); None: the config's steps with an argmax
    fallback (for callers without label names, e.g. benchmarks).
    """
    t = cfg.train
    if decode is None:
        d = cfg.decode
        decode = ThresholdSpec(tuple(map(str, range(labels.shape[1]))), d.start, d.stop, d.step, "argmax")
    device = input_device(model)
    train_idx = np.flatnonzero(fold_of_row != fold)
    val_idx = np.flatnonzero(fold_of_row == fold)
    lengths = np.array([len(x) for x in token_ids])
    pos_weight = pos_weight_from_labels(labels[train_idx], cfg.loss.pos_weight, cfg.loss.pos_weight_max)

    n_batches = math.ceil(len(train_idx) / t.micro_batch_size) // env.world_size
    if n_batches < 1:
        raise TrainingError(f"fold {fold}: {len(train_idx)} training rows are fewer than one micro-batch per rank")
    steps_per_epoch = math.ceil(n_batches / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.num_epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    opt = Optimization(model, cfg, device, dtype, total_steps)

    state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": None, "samples": 0, "real_tokens": 0,
             "padded_tokens": 0, "train_seconds": 0.0, "step_log": []}
    ckpt = fold_dir / "checkpoint" / "state.pt"
    resumed = ckpt.is_file()
    if resumed:
        state = opt.load(ckpt)
        log(f"fold {fold}: resumed at epoch {state['epoch']} step {state['step']}/{total_steps}")

    def save_checkpoint() -> None:
        if env.is_main:
            opt.save(ckpt, state)
            if cfg.hub.push_checkpoints_to:  # Kaggle's 12-hour limit: the next session resumes from the Hub
                from core.hub import push_checkpoint

                push_checkpoint(fold_dir.parent, cfg.hub.push_checkpoints_to, private=cfg.hub.private, log=log)
        env.barrier()
        kill_for_tests(resumed, state["step"])

    model.train()
    done = state["step"] >= total_steps
    for epoch in range(state["epoch"], t.num_epochs):
        if done:
            break
        order = batch_order(lengths[train_idx], t.micro_batch_size, seed=t.seed * 1000 + epoch,
                            group_by_length=t.group_by_length)
        order = [train_idx[b] for b in order][:n_batches * env.world_size]
        # Optimizer step g uses micro-batches order[g*span:(g+1)*span] of all ranks together (rank r takes every
        # world_size-th): the same steps as one process with grad_accum_steps * world_size.
        span = t.grad_accum_steps * env.world_size
        step_rows = [sum(len(b) for b in order[i:i + span]) for i in range(0, len(order), span)]
        order = order[env.rank::env.world_size]
        groups = [order[i:i + t.grad_accum_steps] for i in range(0, len(order), t.grad_accum_steps)]
        first_group = state["batch"] // t.grad_accum_steps
        bar = tqdm(total=len(groups), initial=first_group, desc=f"fold {fold} epoch {epoch + 1}/{t.num_epochs}",
                   disable=not env.is_main, file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        for g in range(first_group, len(groups)):
            torch.manual_seed(step_seed(t.seed, fold, state["step"], env.rank))
            rows_in_group = sum(len(b) for b in groups[g])
            loss_sum = 0.0
            tokens_before = (state["real_tokens"], state["padded_tokens"])
            pieces = [p for rows in groups[g] for p in split_by_tokens(rows, lengths, t.max_tokens_per_micro_batch)]
            for rows in pieces:
                batch = collate([token_ids[i] for i in rows], tokenizer.pad_token_id, labels[rows])
                with autocast(device, dtype):
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits
                loss = multilabel_loss(logits, batch["labels"].to(logits.device), cfg.loss, pos_weight)
                # Weight each micro-batch (or piece of one) by its rows so a short one counts as much as its rows;
                # the all-reduce averages over ranks, so the gradient is the mean over the step's rows on all ranks.
                opt.backward(loss * (len(rows) * env.world_size / step_rows[g]))
                loss_sum += loss.item() * len(rows)
                state["real_tokens"] += int(batch["attention_mask"].sum())
                state["padded_tokens"] += batch["attention_mask"].numel()
            state["samples"] += step_rows[g]  # rows of all ranks
            if env.world_size > 1:
                allreduce_grads(opt.params, env.world_size)
            grad_norm = opt.step()
            state["step"] += 1
            state["batch"] = (g + 1) * t.grad_accum_steps
            # (end time, rows, real tokens, padded tokens) per optimizer step: benchmarks skip the warm-up steps.
            state["step_log"].append((time.perf_counter(), rows_in_group, state["real_tokens"] - tokens_before[0],
                                      state["padded_tokens"] - tokens_before[1]))
            mean_loss = loss_sum / rows_in_group
            check_finite(mean_loss, state["step"], t.nan_guard_steps, dtype, f"fold {fold}")
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{opt.lr:.2e}", gnorm=f"{grad_norm:.2f}")
            if t.save_every_steps and state["step"] % t.save_every_steps == 0 and state["step"] < total_steps:
                state["train_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint()
            if state["step"] >= total_steps:
                done = True
                break
        bar.close()
        state["train_seconds"] += time.perf_counter() - t0

        # End of epoch (or of max_steps): evaluate on the held-out fold, save last/best, checkpoint.
        if env.is_main:
            probs = predict_probs(model, [token_ids[i] for i in val_idx], tokenizer.pad_token_id,
                                  t.eval_batch_size, dtype, desc=f"fold {fold} eval")
            model.train()
            metrics = evaluate(probs, labels[val_idx], decode)
            row = {"epoch": epoch + 1, "step": state["step"], **metrics}
            state["history"].append(row)
            log(f"fold {fold} epoch {epoch + 1}: exact-match {metrics['t0.5/exact_match']:.4f} @0.5, "
                f"{metrics['cascade/exact_match']:.4f} cascade; micro-F1 {metrics['cascade/micro_f1']:.4f} cascade")
            save_adapter(model, fold_dir / "last", {"fold": fold, "epoch": epoch + 1, "metrics": metrics})
            save_npy(fold_dir / "val_probs_last.npy", probs)
            best = state["best"]
            if best is None or metrics["cascade/exact_match"] > best["cascade/exact_match"]:
                state["best"] = row
                save_adapter(model, fold_dir / "best", {"fold": fold, "epoch": epoch + 1, "metrics": metrics})
                save_npy(fold_dir / "val_probs_best.npy", probs)
        env.barrier()
        state["epoch"] = epoch + 1
        state["batch"] = 0
        save_checkpoint()

    keep = t.keep
    probs = np.load(fold_dir / f"val_probs_{keep}.npy") if env.is_main else None
    return {"fold": fold, "val_index": val_idx, "probs": probs, "history": state["history"], "best": state["best"],
            "steps": state["step"], "samples": state["samples"], "real_tokens": state["real_tokens"],
            "padded_tokens": state["padded_tokens"], "train_seconds": state["train_seconds"],
            "step_log": state["step_log"]}


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_fold_metrics(fold_dir: Path, result: dict) -> None:
    skip = ("probs", "val_index", "step_log")
    write_json(fold_dir / "metrics.json", {k: v for k, v in result.items() if k not in skip})
