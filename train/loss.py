"""Multilabel losses on logits: BCE (optionally with per-class pos_weight), focal and asymmetric (ASL)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from core.config import LossArgs


def pos_weight_from_labels(labels: np.ndarray, mode: str, max_weight: float) -> torch.Tensor | None:
    """Per-class positive weight from label frequencies: ``sqrt`` of or plain neg/pos, clipped."""
    if mode == "none":
        return None
    pos = labels.sum(axis=0).astype(np.float64)
    neg = len(labels) - pos
    ratio = neg / np.maximum(pos, 1.0)
    w = np.sqrt(ratio) if mode == "sqrt" else ratio
    return torch.as_tensor(np.clip(w, 1.0, max_weight), dtype=torch.float32)


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, args: LossArgs,
                    pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over rows and classes, computed in fp32."""
    logits, targets = logits.float(), targets.float()
    if args.name == "bce":
        pw = None if pos_weight is None else pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pw)
    if args.name == "focal":
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        return ((1 - p_t) ** args.focal_gamma * bce).mean()
    # Asymmetric loss (Ridnik et al. 2021): down-weights easy negatives and clips their probability.
    p = torch.sigmoid(logits)
    p_neg = (p - args.asl_clip).clamp(min=0) if args.asl_clip > 0 else p
    loss_pos = targets * torch.log(p.clamp(min=1e-8)) * (1 - p) ** args.asl_gamma_pos
    loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg ** args.asl_gamma_neg
    return -(loss_pos + loss_neg).mean()


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor, labelled: torch.Tensor,
                 alpha: float, args: LossArgs, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Knowledge-distillation loss of a batch: ``alpha`` x hard + ``(1 - alpha)`` x soft, a mean over the rows.

    The hard term is :func:`multilabel_loss` (the configured loss, ``pos_weight``) on the labelled rows only,
    scaled by their share of the batch; the soft term is BCE against the teachers' targets ``soft`` (probabilities)
    on every row. An unlabelled row (``labelled`` False) therefore carries the soft term only. ``alpha`` 0: soft
    only, 1: hard only.

    Args:
        logits: rows x classes student logits.
        labels: rows x classes 0/1 labels (any value on unlabelled rows: unused).
        soft: rows x classes teacher probabilities in [0, 1].
        labelled: rows booleans, True where ``labels`` are real.
        alpha: weight of the hard term in [0, 1].
        args: the config's ``loss`` section (the hard term).
        pos_weight: per-class positive weight of the hard term (BCE).
    """
    logits = logits.float()
    labelled = labelled.to(logits.device).bool()
    total = logits.new_zeros(())
    if alpha > 0 and bool(labelled.any()):
        hard = multilabel_loss(logits[labelled], labels.to(logits.device)[labelled], args, pos_weight)
        total = total + alpha * hard * (labelled.sum() / len(labelled))
    if alpha < 1:
        total = total + (1 - alpha) * F.binary_cross_entropy_with_logits(logits, soft.to(logits.device).float())
    return total
