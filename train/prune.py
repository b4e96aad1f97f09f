"""Structured pruning of a decoder: drop whole layers by measured importance, optionally MLP channels, and write a
normal model folder that ``python -m train`` (and everything else) loads like any other base model.

Usage:
    python -m train prune --model MODEL_DIR --keep-layers 12 [--mlp-keep 0.5] --data train.csv --out DIR \\
        [--config C] [--set data.max_length=128] [--max-rows 256] [--batch-size 8]

Layer importance is the block influence (ShortGPT, Men et al. 2024): ``1 - cosine(input hidden state, output
hidden state)`` of each decoder layer, averaged over the real tokens of the data's prompts (``--data`` formatted
with the config's ``data.text_template``; ``--max-rows`` of them). The ``--keep-layers`` most influential layers are
kept, in their original order. ``--mlp-keep F`` then prunes the MLP intermediate channels of every kept layer by
first-order Taylor importance, ``sum |w * dL/dw|`` over the channel's rows of ``gate_proj`` / ``up_proj`` and column
of ``down_proj``, with L the causal-LM loss of the prompts, keeping the fraction F (the same count in each layer:
``intermediate_size`` stays one number).

The output folder (written atomically; it must not exist) holds the model (config ``num_hidden_layers``,
``layer_types`` (Gemma 2/3's sliding/full attention pattern, sliced with the layers) and ``intermediate_size``
updated, weights sliced), the tokenizer and ``prune_report.json`` (the scores, what was kept, the data). Needs the
usual decoder layout: ``model.layers[i].mlp.{gate,up,down}_proj`` (Llama, Mistral, Gemma 1-3, Qwen 2/3...).

Exit status: 0 on success, 2 on bad input.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig
from core.data import collate, read_csv, tokenize
from core.errors import InputError
from core.io import atomic_dir, versions, write_json

logger = logging.getLogger(__name__)

REPORT = "prune_report.json"
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer list, checked for the layout pruning needs.

    Raises:
        InputError: the model has no ``model.layers[i].mlp.{gate,up,down}_proj`` (names its architecture).
    """
    arch = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise InputError(f"prune: {arch} has no model.layers list of decoder layers; supported are decoders laid "
                         f"out like Llama / Mistral / Gemma (model.layers[i].mlp.gate_proj, up_proj, down_proj)")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in MLP_PROJ):
            raise InputError(f"prune: {arch} layer {i} has no mlp.gate_proj / up_proj / down_proj linear layers "
                             f"(found {type(mlp).__name__ if mlp is not None else 'no mlp'})")
    return layers


def batches(token_ids: list[list[int]], pad_id: int, batch_size: int):
    for start in range(0, len(token_ids), batch_size):
        yield collate(token_ids[start:start + batch_size], pad_id)


@torch.no_grad()
def block_influence(model, token_ids: list[list[int]], pad_id: int, batch_size: int) -> np.ndarray:
    """Per layer: ``1 - cosine(input, output hidden state)``, averaged over every real token of ``token_ids``."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask_now = {}
    hooks = []

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += ((1 - cos) * mask_now["m"]).sum().double().cpu()
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        for batch in batches(token_ids, pad_id, batch_size):
            mask_now["m"] = batch["attention_mask"].to(device).float()
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            count += int(batch["attention_mask"].sum())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return (sums / max(count, 1)).numpy()


def mlp_taylor_importance(model, token_ids: list[list[int]], pad_id: int, batch_size: int) -> list[np.ndarray]:
    """Per layer, per MLP intermediate channel: ``sum |w * grad|`` over the channel's weights, the gradient of the
    causal-LM loss (mean over the prompts' predicted tokens, accumulated over all batches)."""
    layers = decoder_layers(model)
    params = [getattr(layer.mlp, n).weight for layer in layers for n in MLP_PROJ]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    device = model.get_input_embeddings().weight.device
    n_targets = sum(max(len(t) - 1, 0) for t in token_ids)
    model.eval()
    for batch in batches(token_ids, pad_id, batch_size):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / max(n_targets, 1)
        loss.backward()
    out = []
    for layer in layers:
        g, u, d = (getattr(layer.mlp, n).weight for n in MLP_PROJ)
        score = ((g * g.grad).abs().sum(1) + (u * u.grad).abs().sum(1) + (d * d.grad).abs().sum(0))
        out.append(score.detach().double().cpu().numpy())
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return out


def keep_layers(model, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep`` (in order), in place; config ``num_hidden_layers`` / ``layer_types``."""
    layers = decoder_layers(model)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    cfg = model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)


def _sliced(linear: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
    w = linear.weight.detach().index_select(dim, idx.to(linear.weight.device)).clone()
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.detach()
        out.bias.data.copy_(b.index_select(0, idx.to(b.device)) if dim == 0 else b)
    return out


def keep_channels(model, channels: list[list[int]]) -> None:
    """Keep the MLP intermediate ``channels[l]`` of each layer ``l`` (same count everywhere), in place."""
    for layer, idx in zip(decoder_layers(model), channels):
        idx = torch.as_tensor(idx, dtype=torch.long)
        layer.mlp.gate_proj = _sliced(layer.mlp.gate_proj, idx, 0)
        layer.mlp.up_proj = _sliced(layer.mlp.up_proj, idx, 0)
        layer.mlp.down_proj = _sliced(layer.mlp.down_proj, idx, 1)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = len(idx)
    model.config.intermediate_size = len(channels[0])


def prune(cfg: RunConfig, data: str | Path, out: str | Path, n_keep: int, mlp_keep: float | None = None,
          max_rows: int = 256, batch_size: int = 8) -> dict:
    """Prune ``cfg.model`` (see the module doc) into the new folder ``out``; returns the report.

    Raises:
        InputError: ``out`` exists, ``n_keep`` outside [1, layers], ``mlp_keep`` outside (0, 1], a model without
            the expected layout, unreadable data.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.model import load_tokenizer, resolve_model_path

    t0 = time.time()
    out = Path(out)
    if out.exists():
        raise InputError(f"--out {out} already exists; choose a new folder")
    if mlp_keep is not None and not 0 < mlp_keep <= 1:
        raise InputError(f"--mlp-keep must be in (0, 1], got {mlp_keep}")
    if max_rows < 1 or batch_size < 1:
        raise InputError(f"--max-rows and --batch-size must be >= 1, got {max_rows}, {batch_size}")
    path = resolve_model_path(cfg.model)
    base_config = AutoConfig.from_pretrained(path)
    n_layers = getattr(base_config, "num_hidden_layers", None)
    if n_layers is None:
        raise InputError(f"{path}/config.json: no num_hidden_layers (not a decoder this command can prune)")
    if not 1 <= n_keep <= n_layers:
        raise InputError(f"--keep-layers {n_keep}: the model {path} has {n_layers} layers (keep 1..{n_layers})")
    ds = read_csv(data, cfg.data, labelled=False)
    texts = ds.texts[:max_rows]
    tok = load_tokenizer(path)
    token_ids = tokenize(texts, tok, cfg.data.max_length)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": device})
    decoder_layers(model)
    logger.info(f"prune: {type(model).__name__} with {n_layers} layers; block influence on {len(texts)} prompts of {ds.path}")
    influence = block_influence(model, token_ids, tok.pad_token_id, batch_size)
    keep = sorted(np.argsort(-influence, kind="stable")[:n_keep].tolist())
    logger.info(f"prune: block influence {np.round(influence, 4).tolist()}; keeping layers {keep}")
    keep_layers(model, keep)
    report = {"model": path, "architecture": type(model).__name__, "data": ds.path, "rows": len(texts),
              "layers": {"before": n_layers, "kept": keep, "dropped": [i for i in range(n_layers) if i not in keep],
                         "block_influence": [float(x) for x in influence]},
              "text_template": cfg.data.text_template, "max_length": cfg.data.max_length}
    if mlp_keep is not None:
        size = model.config.intermediate_size
        n_ch = max(1, round(mlp_keep * size))
        scores = mlp_taylor_importance(model, token_ids, tok.pad_token_id, batch_size)
        channels = [sorted(np.argsort(-s, kind="stable")[:n_ch].tolist()) for s in scores]
        keep_channels(model, channels)
        report["mlp"] = {"intermediate_before": size, "intermediate_after": n_ch, "keep_fraction": mlp_keep,
                         "importance": "sum |w * grad| of the causal-LM loss over gate/up rows and down column",
                         "kept_channels": {str(layer): ch for layer, ch in zip(keep, channels)},
                         "channel_importance": {str(layer): [float(x) for x in s] for layer, s in zip(keep, scores)}}
        logger.info(f"prune: MLP intermediate channels {size} -> {n_ch} in every kept layer")
    params = sum(p.numel() for p in model.parameters())
    report.update({"parameters_after": params, "seconds": round(time.time() - t0, 1), "versions": versions()})
    saved_dtype = getattr(base_config, "dtype", None)
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype, None)
    if isinstance(saved_dtype, torch.dtype) and saved_dtype.is_floating_point:
        model = model.to(saved_dtype)  # measured in fp32, saved as the checkpoint was
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / REPORT, report)
    logger.info(f"wrote {out} ({params:,} parameters; {report['seconds']} s)")
    return report
