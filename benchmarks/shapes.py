"""Model shapes for the benchmarks: random-weight checkpoints of the real architectures (Gemma 3 270M, Gemma-2-9b/27b,
Mistral-7B, a tiny Gemma-2 for CPU rehearsals), their configs, the 27B's 2-GPU split plan, and the DLS prompts as
token ids.

Weights don't change speed or memory, so a random checkpoint of a real shape measures both without the weights.
Neither do the tokenizer's strings: ``python -m benchmarks.shapes tokens`` writes the DLS prompts as Gemma token ids
(and their labels) to a small file; with ``--tokens FILE`` the benchmarks read the ids from it and the shapes get a
stand-in tokenizer (Gemma's special-token ids only), so a GPU machine needs neither the GGUF nor the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DLS = "../shared/data/dls/train.csv"
DLS_DATA = {"id_column": "index", "text_template": "user assesment: {assessment}\n\nTags: {tags}\n\nReview: {text}",
                "label_prefix": "trend_id_res"}
"""The DLS columns and the reference prompt (the benchmarks measure on the DLS data; the toolkit knows none of it)."""
DLS_FALLBACK = 19
"""Class 19, "no meaning": the reference solution's cascade fallback on the DLS data."""
SHAPES = {
    # Real shapes; vocab 262144 for the Gemmas so the Gemma 3 tokenizer's ids fit (Gemma-2's is 256000: +1.4%).
    "gemma-2-9b": {"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16,
                       "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336, "vocab_size": 262144,
                       "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                       "final_logit_softcapping": 30.0},
    "gemma-2-27b": {"model_type": "gemma2", "hidden_size": 4608, "num_hidden_layers": 46, "num_attention_heads": 32,
                        "num_key_value_heads": 16, "head_dim": 128, "intermediate_size": 36864, "vocab_size": 262144,
                        "query_pre_attn_scalar": 144, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                        "final_logit_softcapping": 30.0},
    # Gemma 3 270M text model (the embedded model's config.json); rope and the 5 sliding : 1 full layer_types are
    # Gemma3TextConfig's defaults: rope_theta 1e6 (full), 1e4 (sliding), sliding_window_pattern 6.
    "gemma-3-270m": {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18, "num_attention_heads": 4,
                         "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 2048, "vocab_size": 262144,
                         "query_pre_attn_scalar": 256, "sliding_window": 512, "max_position_embeddings": 32768},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 32000,
                       "sliding_window": None},
    "tiny-gemma2": {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 262144,
                        "query_pre_attn_scalar": 16, "sliding_window": 64, "attn_logit_softcapping": 50.0,
                        "final_logit_softcapping": 30.0},
    # The 270M's architecture (5 sliding : 1 full attention layers), tiny: the CPU rehearsal of the 270M's step.
    "tiny-gemma3": {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
                        "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 128, "vocab_size": 262144,
                        "query_pre_attn_scalar": 16, "sliding_window": 64},
}
CONFIGS = {"embedded": "configs/gemma-3-270m/qlora.yaml", "gemma-3-270m": "configs/gemma-3-270m/qlora.yaml",
           "gemma-2-9b": "configs/gemma-2-9b/qlora.yaml",
           "gemma-2-27b": "configs/gemma-2-27b/qlora.yaml", "mistral-7b": "configs/mistral-7b/qlora.yaml",
           "tiny-gemma2": "configs/gemma-2-9b/qlora.yaml", "tiny-gemma3": "configs/gemma-3-270m/qlora.yaml"}
# The 9B config adapts layers 16+; the tiny shape (a CPU smoke test of this script) has 4, so the upper half.
CONFIG_OVERRIDES = {"tiny-gemma2": ["lora.layers_from=2"]}

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


TOKENIZER_DIR: str | None = None  # --tokenizer: a folder with the Gemma tokenizer, instead of the embedded model's
TOKENS: str | None = None  # --tokens: pre-tokenised prompts (python -m benchmarks.shapes tokens) instead of the CSV


def tokenizer_path(gguf: str | None) -> str:
    return TOKENIZER_DIR or embedded_path(gguf)


def embedded_path(gguf: str | None) -> str:
    from core.config import EMBEDDED_MODEL, ModelArgs
    from core.model import resolve_model_path

    return resolve_model_path(ModelArgs(name_or_path=EMBEDDED_MODEL, gguf_file=gguf), log=log)


def shape_config(name: str, layers: tuple[int, int] | None = None):
    """The config of a real shape, or of the layers ``[start, stop)`` of it (one device's part of a split).

    A part that does not start at layer 0 holds no embedding matrix on its device: its vocabulary shrinks to 256
    rows (token ids are folded into it; ids don't change speed or memory).
    """
    from transformers import AutoConfig

    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if layers is None:
        return config
    start, stop = layers
    spec.update(num_hidden_layers=stop - start, vocab_size=spec["vocab_size"] if start == 0 else 256)
    if getattr(config, "layer_types", None):  # Gemma-2 alternates sliding / full attention by layer index
        spec["layer_types"] = config.layer_types[start:stop]
    return AutoConfig.for_model(config.model_type, **spec, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def build_shape(name: str, gguf: str | None, root: Path, layers: tuple[int, int] | None = None) -> str:
    """A random-weight checkpoint of a real shape or of a part of it (bf16, built on the GPU), with the Gemma 3
    tokenizer (with ``TOKENS`` set: a stand-in, see :func:`standin_tokenizer`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = root / (name if layers is None else f"{name}-layers{layers[0]}-{layers[1]}")
    if (target / "config.json").is_file():
        return str(target)
    t0 = time.time()
    config = shape_config(name, layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    tok = standin_tokenizer() if TOKENS else AutoTokenizer.from_pretrained(tokenizer_path(gguf))
    tok.save_pretrained(target)
    del model
    if device == "cuda":  # this process lives on while the workers measure: give the memory back
        torch.cuda.empty_cache()
    log(f"built random {target.name} in {time.time() - t0:.0f}s")
    return str(target)


def split_plan(name: str, n_devices: int = 2, gib: float = 15.0) -> list[tuple[int, int]]:
    """The decoder layers ``[start, stop)`` that each GPU holds when the toolkit loads this shape in 4-bit with
    ``device_map="auto"`` (``train.parallel: split``) on ``n_devices`` GPUs of ``gib`` GiB.

    Runs transformers' own placement (balanced memory, decoder layers never split, 4-bit sizes from the
    bitsandbytes quantizer) on the meta device, so no GPU is needed. The embedding is on the first device, the
    final norm and the ``score`` head on the last (checked).
    """
    from unittest import mock

    import torch
    import transformers.integrations.accelerate as hf_accelerate
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    config = shape_config(name)
    config.num_labels = 50
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    quantizer = AutoHfQuantizer.from_config(bnb, pre_quantized=False)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float16)
    quantizer.preprocess_model(model, dtype=torch.float16, device_map="auto")
    budget = {i: int(gib * 2**30) for i in range(n_devices)}
    # transformers reads the free memory of the GPUs it sees; here the GPUs are described, not present.
    with mock.patch.object(hf_accelerate, "get_max_memory", lambda max_memory=None: dict(max_memory)):
        device_map = hf_accelerate._get_device_map(model, "auto", budget, quantizer)

    def placed(module: str):  # the device of the closest enclosing entry ("" = the whole model)
        return device_map[max((k for k in device_map if k == "" or module == k or module.startswith(k + ".")),
                              key=len)]

    layer_device = [placed(f"model.layers.{i}") for i in range(config.num_hidden_layers)]
    if layer_device != sorted(layer_device) or placed("model.embed_tokens") != layer_device[0] \
            or placed("score") != layer_device[-1]:
        raise RuntimeError(f"unexpected placement for {name}: {device_map}")
    plan = []
    for d in sorted(set(layer_device)):
        idx = [i for i, x in enumerate(layer_device) if x == d]
        plan.append((idx[0], idx[-1] + 1))
    return plan


def standin_tokenizer():
    """A tokenizer with Gemma's special tokens only (pad 0, eos 1, bos 2, unk 3): what a checkpoint of a shape needs
    when the token ids come pre-tokenised (``TOKENS``): the pad id for batching, nothing else."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(specials)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def write_tokens(data: str, gguf: str | None, out: str) -> dict:
    """The prompts of ``data`` as Gemma token ids (the DLS prompt template, max length 256) with their labels, in one
    compressed ``.npz`` (the DLS train set: ~3,700 rows, well under 1 MiB)."""
    from core.config import DataArgs
    from core.data import read_csv, tokenize
    from core.model import load_tokenizer

    ds = read_csv(data, DataArgs(train_csv=data, **DLS_DATA))
    tok = load_tokenizer(tokenizer_path(gguf))
    ids = tokenize(ds.texts, tok, 256)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, ids=np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]),
                        offsets=np.r_[0, np.cumsum(lengths)], labels=ds.labels.astype(np.uint8),
                        label_names=np.array(ds.label_names), source=np.array(Path(data).name),
                        tokenizer_vocab=np.array(len(tok)))
    return {"rows": len(ids), "labels": ds.labels.shape[1], "tokens_median": int(np.median(lengths)),
            "tokens_max": int(lengths.max()), "bytes": Path(out).stat().st_size}


def read_tokens(path: str, vocab_size: int | None = None):
    """(token ids per row, labels, label names) from :func:`write_tokens`; ids folded into ``vocab_size``."""
    with np.load(path) as z:
        flat, offsets = z["ids"].astype(np.int64), z["offsets"]
        if vocab_size is not None and flat.size and flat.max() >= vocab_size:
            flat = flat % vocab_size
        ids = [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
        return ids, z["labels"].astype(np.int8), [str(x) for x in z["label_names"]]


def dls_tokens(data: str, gguf: str | None, vocab_size: int, rows: int | None = None):
    """DLS prompts tokenised with the Gemma tokenizer (ids folded into the model's vocab), labels, ids (read from
    ``TOKENS`` when set)."""
    if TOKENS:
        ids, labels, _ = read_tokens(TOKENS, vocab_size)
        n = rows or len(ids)
        return ids[:n], labels[:n]
    from core.config import DataArgs
    from core.data import read_csv, tokenize
    from core.model import load_tokenizer

    ds = read_csv(data, DataArgs(train_csv=data, **DLS_DATA))
    tok = load_tokenizer(tokenizer_path(gguf))
    ids = tokenize(ds.texts, tok, 256)
    if vocab_size < len(tok):
        ids = [[i % vocab_size for i in row] for row in ids]
    n = rows or len(ids)
    return ids[:n], ds.labels[:n]


def part_lora_layers(model_key: str, overrides: list[str], layers: tuple[int, int]) -> list[int]:
    """The config's LoRA layers that fall in ``[start, stop)``, renumbered from 0 (one device's part)."""
    from core.config import RunConfig

    lora = RunConfig.from_yaml(CONFIGS[model_key], [*CONFIG_OVERRIDES.get(model_key, []), *overrides]).lora
    n_layers = SHAPES[model_key]["num_hidden_layers"]
    full = lora.layers_to_transform if lora.layers_to_transform is not None else range(lora.layers_from or 0, n_layers)
    return [i - layers[0] for i in full if layers[0] <= i < layers[1]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shapes", description="Pre-tokenise a labelled CSV for "
                                "the benchmarks (so that a GPU machine needs no tokenizer): writes OUT (.npz).")
    p.add_argument("command", choices=["tokens"])
    p.add_argument("--data", default=DLS)
    p.add_argument("--out", required=True)
    p.add_argument("--gguf", default=None, help="the Gemma 3 270M GGUF (default: the registry package)")
    p.add_argument("--tokenizer", default=None, help="folder with the Gemma tokenizer (default: the embedded model's)")
    args = p.parse_args(argv)
    global TOKENIZER_DIR
    TOKENIZER_DIR = args.tokenizer
    print(json.dumps({"out": args.out, **write_tokens(args.data, args.gguf, args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
