"""The optimizer side of a training run: AdamW (or 8-bit AdamW) with LoRA+ / head learning-rate groups, the LR
schedule with warm-up, the fp16 gradient scaler and gradient clipping, and the trainable weights + optimizer state
that a checkpoint (:mod:`train.checkpoint`) saves and restores."""

from __future__ import annotations

from pathlib import Path

import torch

from core.config import RunConfig
from core.errors import TrainingError
from train import checkpoint
from train.checkpoint import Progress


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
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = round(cfg.train.warmup_ratio * total_steps)
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

    def load(self, folder: Path, fingerprint: str, progress_type: type[Progress] = Progress) -> Progress:
        """Restore everything saved by :meth:`save` (refused whole if it does not fit); returns the progress, a
        ``progress_type`` (the recipe's :class:`train.checkpoint.Progress`)."""
        payload, progress = checkpoint.load(folder, fingerprint, progress_type)
        load_trainable_state(self.model, payload["trainable"], str(folder))
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        return progress
