"""LoRA for training: freeze the base, add adapters and a trainable ``score`` head, start from a DAPT adapter."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from core.config import LoraArgs
from core.errors import ConfigError, InputError


def apply_lora(model, largs: LoraArgs, grad_checkpointing: bool, task: str = "seq_cls"):
    """Freeze the base, add LoRA adapters and a trainable fp32 ``score`` head (saved with the adapter).

    ``task="causal_lm"`` (domain-adaptive pretraining): LoRA only, no head. For classification, LoRA starts
    from ``largs.init_adapter`` when set (see :func:`load_init_adapter`).

    We deliberately skip peft's ``prepare_model_for_kbit_training``: it upcasts every non-quantized weight to
    fp32, including the embedding matrix (Gemma: 256k rows, ~0.9B parameters in 9B), for no benefit with LoRA.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    layers = largs.layers_to_transform
    if layers is None and largs.layers_from is not None:
        if not 0 <= largs.layers_from < n_layers:
            raise InputError(f"lora.layers_from={largs.layers_from} is outside the model's {n_layers} layers")
        layers = list(range(largs.layers_from, n_layers))
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise InputError(f"lora.layers_to_transform {bad} outside the model's {n_layers} layers")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in largs.target_modules if m not in names]
    if missing:
        raise InputError(f"lora.target_modules {missing} not found in {type(model).__name__}")
    if task not in ("seq_cls", "causal_lm"):
        raise ValueError(f"apply_lora: task must be 'seq_cls' or 'causal_lm', got {task!r}")
    seq_cls = task == "seq_cls"
    lcfg = LoraConfig(task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM, r=largs.r,
                      lora_alpha=largs.alpha, lora_dropout=largs.dropout,
                      target_modules=list(largs.target_modules), layers_to_transform=layers,
                      use_dora=largs.use_dora, modules_to_save=["score"] if seq_cls else None, bias="none")
    if grad_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs and with DDP (no enable_input_require_grads).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lcfg)
    # Trainable weights in fp32: GradScaler (fp16) needs fp32 master weights; autocast handles the matmuls.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if seq_cls and largs.init_adapter:
        load_init_adapter(model, largs)
    return model


_LORA_KEY = re.compile(r"(?:^|\.)(layers\.\d+\..*\.lora_(?:A|B|magnitude_vector))(?:\.|$)")


def _lora_suffix(name: str) -> str | None:
    """The key a LoRA weight has in both the CAUSAL_LM and the SEQ_CLS layout, in the model or in an adapter file:
    ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` -> ``layers.3.self_attn.q_proj.lora_A``.
    """
    m = _LORA_KEY.search(name)
    return m.group(1) if m else None


def load_init_adapter(model, largs: LoraArgs) -> None:
    """Copy the LoRA weights of ``largs.init_adapter`` (e.g. a ``python -m train dapt`` adapter, saved from a causal
    LM) into ``model``'s LoRA layers, matched by module (``layers.N.self_attn.q_proj.lora_A``).

    Raises:
        InputError: the folder or its weights are missing.
        ConfigError: the adapter does not fit the ``lora`` section (r, alpha, DoRA, modules, layers, shapes).
    """
    import json

    from safetensors.torch import load_file

    key = f"lora.init_adapter={largs.init_adapter}"
    folder = Path(largs.init_adapter).expanduser()
    if not folder.is_dir():
        raise InputError(f"{key}: folder not found")
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise InputError(f"{key}: no finished LoRA adapter there (adapter_config.json / adapter_model.safetensors "
                         f"missing; did `python -m train dapt` finish?)")
    acfg = json.loads((folder / "adapter_config.json").read_text())
    problems = []
    for name, ours, theirs in [("lora.r", largs.r, acfg.get("r")), ("lora.alpha", largs.alpha, acfg.get("lora_alpha")),
                               ("lora.use_dora", largs.use_dora, bool(acfg.get("use_dora")))]:
        if ours != theirs:
            problems.append(f"{name} is {ours!r}, the adapter has {theirs!r}")
    targets = acfg.get("target_modules")
    targets = sorted([targets] if isinstance(targets, str) else targets or [])
    if targets != sorted(largs.target_modules):
        problems.append(f"lora.target_modules is {sorted(largs.target_modules)}, the adapter has {targets}")
    if problems:
        raise ConfigError(f"{key} does not fit the lora section: " + "; ".join(problems))
    saved = {}
    for name, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
        suffix = _lora_suffix(name)
        if suffix is None:
            raise ConfigError(f"{key}: weight {name!r} is not a LoRA weight of a decoder layer")
        saved[suffix] = tensor
    params = {}
    for name, p in model.named_parameters():
        suffix = _lora_suffix(name)
        if suffix is not None:
            params[suffix] = p
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise ConfigError(f"{key}: the adapter's LoRA layers differ from the model's (lora.layers_from / "
                          f"lora.layers_to_transform?): the adapter lacks {missing[:4]} ({len(missing)} in all), "
                          f"has extra {extra[:4]} ({len(extra)} in all)")
    bad = [f"{k}: adapter {tuple(saved[k].shape)}, model {tuple(p.shape)}" for k, p in params.items()
           if saved[k].shape != p.shape]
    if bad:
        raise ConfigError(f"{key}: weight shapes differ (another base model?): {bad[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(device=p.device, dtype=p.dtype))


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit weights per stored byte
        total += n
    return {"trainable": trainable, "total": total}
