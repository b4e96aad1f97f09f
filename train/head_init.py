"""The ``score`` head initialised from the label descriptions (``model.head_init: descriptions``).

A fresh head is a random matrix: every class starts as noise and a rare class (a few positives in a fold) has few
gradients to become anything else. Here each class's row starts as the base model's pooled hidden state of that
class's name / description (``data.label_names_csv``; the label's column name where a class has none), so that a
row scoring a text starts out pointing at the text's meaning of that class.

What the rows are, in order:

1. Each description is put through ``data.text_template`` as the value of its text field (the other fields empty) with
   the one prompt formatter, :func:`core.data.format_prompt`, and tokenised as the training rows are. The head reads the
   last token of a formatted prompt; a description in the same frame ("...Review: <description>") ends in the same
   place a training row does, instead of at a bare phrase the head never sees. With the default ``{text}`` template
   the two are the same.
2. Pooled exactly as the classifier pools: the input of the ``score`` layer at the rightmost token that is not the
   pad token (transformers' ``GenericForSequenceClassification``, which Gemma-2 / Gemma-3 / Mistral share), taken
   with a forward hook on the head itself, so it is the hidden state the head multiplies (after the final norm), from
   the model as it is at step 0: after :func:`train.lora.apply_lora`, in eval mode (no LoRA dropout), under the
   run's autocast. A fresh adapter's LoRA B is zero, so that is the base model; with ``lora.init_adapter`` (a DAPT
   adapter) it is the base model plus the DAPT adapter, the model that starts training.
3. Centred (the mean over the classes subtracted: a language model's hidden states share a large common direction,
   and rows that all point along it would give every class the same logit), each row normalised (every class the
   same norm), then all scaled by one factor so that the logits the rows give the descriptions themselves spread
   (std over descriptions x classes) as much as the random head's do: the head starts at the random head's logit
   scale. Not at its row norm: the text's hidden states share directions with the descriptions' (random rows share
   none), so rows of the random rows' norm give logits ~6x the random head's. Measured on the real Gemma 3 270M
   (bf16) with the DLS names, on 200 training rows: logit std 3.35 against the random head's 3.52 (at the random
   rows' norm: 21.0); the rows' norm is 0.081 against the random rows' 0.508.

The rows go into the trainable (fp32) copy of the head that :func:`train.lora.apply_lora` made. Every DDP rank
computes the same rows; :func:`train.dist.broadcast_trainable` (in :func:`train.run.fit`, before the first step) then
gives every rank rank 0's, as for the random init. A resumed fold restores its head from the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from core.config import DataArgs
from core.data import collate, format_prompt, template_fields, text_field, tokenize
from core.errors import ConfigError
from core.model import autocast, input_device

logger = logging.getLogger(__name__)


def description(descriptions: Mapping[str, str], name: str) -> str:
    """``name``'s description, stripped; "" where it has none or an empty one (its row then starts from its name)."""
    return str(descriptions.get(name) or "").strip()


def description_texts(label_names: Sequence[str], descriptions: Mapping[str, str], template: str) -> list[str]:
    """The text each class's row is pooled from: its description (its label name where it has none or an empty
    one) as the text field of ``template`` (see the module doc, step 1)."""
    fields = template_fields(template)
    out = []
    for name in label_names:
        text = description(descriptions, name) or name
        out.append(format_prompt(template, {text_field(fields): text}) if fields else text)
    return out


def score_module(model):
    """The classifier's ``score`` layer (peft's wrapper around it when LoRA is applied)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score


def trainable_score_weight(model) -> torch.nn.Parameter:
    """The head's trainable weight (classes x hidden): the one :class:`train.optim.Optimization` trains as the head."""
    found = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    if len(found) != 1:
        raise ValueError(f"expected one trainable score weight, found {len(found)} (was apply_lora called?)")
    return found[0]


@torch.no_grad()
def pooled_states(model, token_ids: list[list[int]], batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The hidden state the ``score`` head reads for each row (rows x hidden, fp32, on the head's device): the head's
    input at the rightmost non-pad token, as ``GenericForSequenceClassification`` pools. Eval mode, the run's
    autocast; the model's train/eval mode is restored."""
    pad_id = model.config.get_text_config().pad_token_id
    device = input_device(model)
    captured = []
    hook = score_module(model).register_forward_hook(lambda module, args, output: captured.append(args[0]))
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(token_ids), batch_size):
            batch = collate(token_ids[start:start + batch_size], pad_id)
            ids = batch["input_ids"].to(device)
            captured.clear()
            with autocast(device, dtype):
                model(input_ids=ids, attention_mask=batch["attention_mask"].to(device))
            hidden = captured[-1]
            # transformers' rule: the rightmost token that is not the pad token (right or left padding alike).
            non_pad = (ids != pad_id).to(hidden.device, torch.int32)
            last = (torch.arange(ids.shape[-1], device=hidden.device, dtype=torch.int32) * non_pad).argmax(-1)
            out.append(hidden[torch.arange(len(ids), device=hidden.device), last].float())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(out)


def head_rows(states: torch.Tensor, random_rows: torch.Tensor) -> torch.Tensor:
    """Pooled states (classes x hidden) -> head rows: centred over the classes, normalised (every class the same
    norm), and scaled by one factor so that the logits they give the descriptions spread (std over descriptions x
    classes) as much as the random head's ``random_rows`` do (module doc, step 3).

    Raises:
        ConfigError: a class whose state is the mean of all (one class, or every description the same).
    """
    states = states.float()
    centred = states - states.mean(dim=0, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True)
    flat = (norms.squeeze(1) <= 1e-6 * states.norm(dim=1).clamp_min(1e-12)).nonzero().flatten().tolist()
    if flat:
        raise ConfigError(f"model.head_init=descriptions: class(es) {flat} have the mean pooled state of all classes "
                          f"(one class, or the same description for every class): nothing to centre; use random")
    unit = centred / norms
    return unit * ((states @ random_rows.float().T).std() / (states @ unit.T).std())


def init_score_head(model, tokenizer, label_names: Sequence[str], descriptions: Mapping[str, str], data: DataArgs,
                    dtype: torch.dtype, batch_size: int) -> dict:
    """Set the trainable ``score`` rows from the label descriptions (module doc); returns what it did: the classes,
    how many fell back to their label name, the rows' norm and the random rows' mean norm, the logits' std on the
    descriptions (the random head's, which the new rows match)."""
    texts = description_texts(label_names, descriptions, data.text_template)
    weight = trainable_score_weight(model)
    states = pooled_states(model, tokenize(texts, tokenizer, data.max_length), batch_size, dtype).to(weight.device)
    if weight.shape != (len(label_names), states.shape[1]):
        raise ValueError(f"score head {tuple(weight.shape)} does not fit {len(label_names)} labels x "
                         f"{states.shape[1]} hidden")
    random_rows = weight.detach().float().clone()
    rows = head_rows(states, random_rows)
    with torch.no_grad():
        weight.copy_(rows.to(weight.dtype))
    missing = [n for n in label_names if not description(descriptions, n)]
    info = {"classes": len(texts), "from_names": len(missing),
            "row_norm": float(rows.norm(dim=1).mean()), "random_row_norm": float(random_rows.norm(dim=1).mean()),
            "logit_std": float((states @ random_rows.T).std())}
    if descriptions and missing:  # a names file for other labels (e.g. the sample's): say so, not silently
        logger.warning(f"model.head_init=descriptions: {len(missing)} of {len(texts)} classes have no name in "
                       f"data.label_names_csv ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                       f"their head rows start from the label column's name")
    logger.info(f"score head from the label descriptions: {info['classes']} classes ({info['from_names']} from their "
                f"label name); row norm {info['row_norm']:.4g} (the random rows' {info['random_row_norm']:.4g}), "
                f"logit std on the descriptions {info['logit_std']:.3g} as the random head's")
    return info
