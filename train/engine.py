"""The one training engine of the toolkit: epochs of optimizer steps with gradient accumulation, AMP, the data-parallel
gradient all-reduce, the collective NaN guard, resumable checkpoints and the callbacks tests inject.

Classification folds (:func:`train.loop.fit_fold`) and domain-adaptive pretraining (:mod:`train.dapt`) differ only
in what a micro-batch computes and what happens at the end of an epoch; both run :func:`run_epochs`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.config import RunConfig
from core.errors import TrainingError
from train import checkpoint
from train.checkpoint import Progress


def step_seed(seed: int, fold: int, step: int, rank: int) -> int:
    """A seed per (fold, optimizer step, rank): dropout is reproducible after a resume without saved RNG state."""
    return int(np.random.SeedSequence([seed, fold, step, rank]).generate_state(1)[0])


def build_optimizer(model, cfg: RunConfig, device: torch.device):
    t = cfg.train
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if "score" in n]
    adapters = [(n, p) for n, p in trainable if "score" not in n]
    if t.lora_plus_ratio is None:
        groups = [{"params": [p for _, p in adapters], "lr": t.lr}]
    else:  # LoRA+: B learns faster than A (peft's create_loraplus_optimizer has no group for the head)
        groups = [{"params": [p for n, p in adapters if "lora_B" not in n], "lr": t.lr},
                  {"params": [p for n, p in adapters if "lora_B" in n], "lr": t.lr * t.lora_plus_ratio}]
    groups.append({"params": head, "lr": t.head_lr or t.lr})
    name = t.optimizer
    if name == "auto":
        name = "adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=device.type == "cuda")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, weight_decay=t.weight_decay)


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = int(round(cfg.train.warmup_ratio * total_steps))
    if cfg.train.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if cfg.train.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    extra = [n for n in state if n not in params]
    bad = [n for n, v in state.items() if n in params and tuple(v.shape) != tuple(params[n].shape)]
    if missing or extra or bad:
        raise TrainingError(f"{where} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                            f"other shapes {bad[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


class Optimization:
    """Optimizer, LR schedule and fp16 grad scaler of one training run (a fold, or DAPT), with the checkpoint that
    makes it resumable (:mod:`train.checkpoint`: safetensors + JSON, no pickle)."""

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

    def save(self, folder: Path, progress: Progress, fingerprint: str) -> None:
        payload = {"trainable": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        checkpoint.save(folder, payload, progress, fingerprint)

    def load(self, folder: Path, fingerprint: str) -> Progress:
        """Restore everything saved by :meth:`save` (refused whole if it does not fit); returns the progress."""
        payload, progress = checkpoint.load(folder, fingerprint)
        load_trainable_state(self.model, payload["trainable"], str(folder))
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        return progress


@dataclass
class DistContext:
    """What the engine needs of the process group: rank, world size, a barrier and the collectives."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


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


def broadcast_trainable(params: list[torch.Tensor], world_size: int) -> None:
    """Every rank starts from rank 0's trainable weights (LoRA init, score head), not from equal seeds."""
    if world_size < 2:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def check_finite(loss: float, step: int, guard_steps: int, dtype: torch.dtype, what: str,
                 world_size: int = 1) -> None:
    """The NaN/inf guard of the first ``guard_steps`` optimizer steps, with what to change.

    Under torchrun every rank checks every rank's loss (one tiny all-reduce), so a non-finite loss on one rank
    stops all of them with the same message instead of leaving the others waiting in the next all-reduce.
    """
    if step > guard_steps:
        return
    bad_ranks = [] if math.isfinite(loss) else [0]
    if world_size > 1:
        flags = torch.zeros(world_size, dtype=torch.float64)
        flags[torch.distributed.get_rank()] = 0.0 if math.isfinite(loss) else 1.0
        torch.distributed.all_reduce(flags)
        bad_ranks = [r for r in range(world_size) if flags[r] > 0]
    if bad_ranks:
        hint = (" fp16 overflows easily with Gemma: use a bf16 GPU, model.dtype=float32, or a lower train.lr"
                if dtype == torch.float16 else " lower train.lr or check the data")
        # One process: the value (nan / inf); several: every rank says the same (it knows which ranks, not values).
        value = f"not finite on rank(s) {bad_ranks}" if world_size > 1 else str(loss)
        raise TrainingError(f"{what}: loss is {value} at optimizer step {step} "
                            f"(dtype {str(dtype).removeprefix('torch.')}).{hint}")


@dataclass
class Callbacks:
    """Hooks a caller (a test, a benchmark) injects into :func:`run_epochs`; each gets the progress."""

    on_checkpoint: list[Callable[[Progress, bool], None]] = field(default_factory=list)
    """After each checkpoint is written: (progress, resumed). Tests kill the process here."""
    on_step: list[Callable[[Progress, float], None]] = field(default_factory=list)
    """After each optimizer step: (progress, mean loss on this rank)."""

    @classmethod
    def of(cls, value) -> Callbacks:
        return value if isinstance(value, Callbacks) else cls()


def run_epochs(*, opt: Optimization, progress: Progress, num_epochs: int, total_steps: int,
               epoch_steps: Callable[[int], Sequence], train_step: Callable[[int, object], float],
               end_epoch: Callable[[int, bool], None] | None, save: Callable[[], None], checkpoint_last: bool,
               save_every_steps: int, guard_steps: int, dtype: torch.dtype, what: str, seed_of_step: Callable[[int],
               int], dist: DistContext, grad_accum_steps: int, resumed: bool, callbacks: Callbacks | None = None,
               desc: str = "train") -> Progress:
    """Run (or finish) the epochs of one training run.

    Args:
        epoch_steps: epoch -> this rank's optimizer steps (each the micro-batches of one step).
        train_step: (step index in the epoch, its micro-batches) -> mean loss; runs forward + backward.
        end_epoch: (epoch, done) after each epoch's steps (evaluation, adapter saves), on every rank.
        save: write the checkpoint (called by rank 0 only; followed by a barrier).
        checkpoint_last: checkpoint after the last epoch too (a fold: its adapters and history are on disk then;
            DAPT: the finished adapter replaces the checkpoint instead).
        seed_of_step: optimizer step -> torch seed (reproducible dropout after a resume).
    """
    callbacks = callbacks or Callbacks()

    def checkpoint_now() -> None:
        if dist.is_main:
            save()
        dist.barrier()
        for cb in callbacks.on_checkpoint:
            cb(progress, resumed)

    done = progress.step >= total_steps
    for epoch in range(progress.epoch, num_epochs):
        if done:
            break
        steps = epoch_steps(epoch)
        first = progress.batch // grad_accum_steps
        bar = tqdm(total=min(len(steps), first + total_steps - progress.step), initial=first,
                   desc=f"{desc} epoch {epoch + 1}/{num_epochs}", disable=not dist.is_main, file=sys.stderr,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        for g in range(first, len(steps)):
            torch.manual_seed(seed_of_step(progress.step))
            mean_loss = train_step(g, steps[g])
            if dist.world_size > 1:
                allreduce_grads(opt.params, dist.world_size)
            grad_norm = opt.step()
            progress.step += 1
            progress.batch = (g + 1) * grad_accum_steps
            for cb in callbacks.on_step:
                cb(progress, mean_loss)
            check_finite(mean_loss, progress.step, guard_steps, dtype, what, dist.world_size)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{opt.lr:.2e}", gnorm=f"{grad_norm:.2f}")
            if progress.step >= total_steps:
                done = True
                break
            if save_every_steps and progress.step % save_every_steps == 0:
                progress.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint_now()
        bar.close()
        progress.train_seconds += time.perf_counter() - t0
        if end_epoch is not None:
            end_epoch(epoch, done)
        if checkpoint_last or not done:
            progress.epoch = epoch + 1
            progress.batch = 0
            checkpoint_now()
    return progress
