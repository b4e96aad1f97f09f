"""Multilabel losses on logits: BCE (optionally with per-class pos_weight), focal and asymmetric (ASL), and the
distillation mix; the chunked next-token loss of domain-adaptive pretraining (:func:`lm_loss_sum`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from core.config import LossArgs
from core.data import collate
from core.errors import InputError
from core.model import autocast


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


# ------------------------------------------------------------------------------------------- next-token loss (DAPT)

LOGIT_CHUNK_ELEMENTS = 2 ** 26
"""Logits computed at once (64M: 256 MiB in fp32, 256 tokens of Gemma's 262k vocabulary)."""


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``targets``, chunk by chunk.

    The gradient with respect to ``hidden`` (N x H, small) is computed in the forward pass, chunk by chunk, so that
    at most one chunk of logits (and its softmax, in place) exists at a time and nothing vocabulary-sized is kept
    for the backward pass or computed twice. The weight is frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, grad_enabled):
        need_grad = ctx.needs_input_grad[0] and grad_enabled
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i:i + chunk], targets[i:i + chunk]
            logits = F.linear(h.to(weight.dtype), weight, bias).float()
            if softcap:
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()                     # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0       # d loss / d logits
                if softcap:
                    probs.mul_(1.0 - tanh.square_())                          # through the soft-capping
                grad[i:i + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype) if grad is not None else None), None, None, None, None, None, None


def lm_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype,
                chunk_elements: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the real (non-pad) targets of a right-padded batch, and their count.

    The same as the model's own loss with pad labels set to -100, without materialising B x T x vocab logits: the
    decoder's hidden states are gathered at the positions whose next token is real, and the frozen LM head + softmax
    run on chunks of ``chunk_elements`` logits (default :data:`LOGIT_CHUNK_ELEMENTS`): see ``_LinearCrossEntropy``.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()) or not isinstance(head, torch.nn.Linear):
        raise InputError("lora.target_modules must not adapt the LM head in DAPT (it is not part of the classifier)")
    device = lm.get_input_embeddings().weight.device
    with autocast(device, dtype):
        hidden = lm.get_decoder()(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device)).last_hidden_state
    hidden = hidden.to(head.weight.device)  # layers split over GPUs (train.parallel=split)
    keep = attention_mask[:, 1:].bool().to(hidden.device)
    hidden = hidden[:, :-1][keep]
    targets = input_ids.to(hidden.device)[:, 1:][keep]
    chunk = max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // head.weight.shape[0])
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    loss = _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, softcap, chunk, torch.is_grad_enabled())
    return loss, int(targets.numel())


@torch.no_grad()
def corpus_loss(model, token_ids: list[list[int]], pad_id: int, batch_size: int, dtype: torch.dtype) -> float:
    """Mean next-token cross-entropy per token over ``token_ids`` (dropout off)."""
    was_training = model.training
    model.eval()
    order = np.argsort([-len(t) for t in token_ids], kind="stable")
    total, n = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([token_ids[i] for i in order[start:start + batch_size]], pad_id)
        loss, k = lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], dtype)
        total, n = total + loss.item(), n + k
    model.train(was_training)
    return total / max(n, 1)
