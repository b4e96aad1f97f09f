"""Training speed and memory: the reference notebook's recipe vs the toolkit's default path, side by side.

Usage (one GPU; each measurement runs in its own process so peak memory is clean):
    python -m train.bench --models embedded,gemma-2-9b,mistral-7b,gemma-2-27b --steps 30
    python -m train.bench --models gemma-2-9b --profiles toolkit-t4          # only the T4 (15 GiB, fp16) profile
    python -m train.bench --models gemma-2-27b --profiles toolkit-split      # per-GPU peaks of the 2x T4 split
    python -m train.bench --quality --epochs 1                                # exact match, fold 0, real 270M
    python -m train.bench --quality --epochs 1 --folds 0,1,2,3,4 --out-oof DIR # out-of-fold, all 5 folds

Recipes:
  reference   HF Trainer, micro-batch 2, grad-accum 2, fp16, LoRA r16 on q/k/v of the upper layers, gradient
              checkpointing via prepare_model_for_kbit_training, random batch order, pad to longest, 8-bit AdamW.
  toolkit     the toolkit's training loop with the model's config (configs/<model>/qlora.yaml).
  toolkit-t4  the same, fp16, with the process capped at a T4's 15 GiB (torch.cuda.set_per_process_memory_fraction).
  toolkit-split  train.parallel=split (the 27B's T4 profile) measured on one GPU: the layers each of 2 T4s would
              hold (transformers' device_map="auto" placement, computed on the meta device) built as a model of
              their own and trained in the T4 profile, one process per device: the peak of each is that device's
              peak. The split runs its devices one after the other, so its samples/s is rows / sum of step times.
Models: ``embedded`` = real Gemma 3 270M; the others are random-weight checkpoints of the real shapes, built on the
GPU (weights don't change speed or memory). Token lengths are those of the DLS data under the Gemma tokenizer.
MFU estimate = 4 x non-embedding parameters x real tokens/s / peak dense TFLOP/s of the device (forward 2N +
backward through activations 2N; LoRA weight gradients and attention FLOPs ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DLS = "../shared/data/dls/train.csv"
SHAPES = {
    # Real shapes; vocab 262144 for the Gemmas so the Gemma 3 tokenizer's ids fit (Gemma-2's is 256000: +1.4%).
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, intermediate_size=14336, vocab_size=262144,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
    "gemma-2-27b": dict(model_type="gemma2", hidden_size=4608, num_hidden_layers=46, num_attention_heads=32,
                        num_key_value_heads=16, head_dim=128, intermediate_size=36864, vocab_size=262144,
                        query_pre_attn_scalar=144, sliding_window=4096, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000,
                       sliding_window=None),
    "tiny-gemma2": dict(model_type="gemma2", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=262144,
                        query_pre_attn_scalar=16, sliding_window=64, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0),
}
CONFIGS = {"embedded": "configs/gemma-3-270m/qlora.yaml", "gemma-2-9b": "configs/gemma-2-9b/qlora.yaml",
           "gemma-2-27b": "configs/gemma-2-27b/qlora.yaml", "mistral-7b": "configs/mistral-7b/qlora.yaml",
           "tiny-gemma2": "configs/gemma-2-9b/qlora.yaml"}
# The 9B config adapts layers 16+; the tiny shape (a CPU smoke test of this script) has 4, so the upper half.
CONFIG_OVERRIDES = {"tiny-gemma2": ["lora.layers_from=2"]}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "A10G": 125.0}
REF_LAYERS_FROM = {"gemma2": 16, "mistral": 8}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- shared inputs
TOKENIZER_DIR: str | None = None  # --tokenizer: a folder with the Gemma tokenizer, instead of the embedded model's


def tokenizer_path(gguf: str | None) -> str:
    return TOKENIZER_DIR or embedded_path(gguf)


def embedded_path(gguf: str | None) -> str:
    from train.config import EMBEDDED_MODEL, ModelArgs
    from train.model import resolve_model_path

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
    tokenizer."""
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
    AutoTokenizer.from_pretrained(tokenizer_path(gguf)).save_pretrained(target)
    del model
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


def dls_tokens(data: str, gguf: str | None, vocab_size: int, rows: int | None = None):
    """DLS prompts tokenised with the Gemma tokenizer (ids folded into the model's vocab), labels, ids."""
    from train.config import DataArgs
    from train.data import read_csv, tokenize
    from train.model import load_tokenizer

    ds = read_csv(data, DataArgs(train_csv=data))
    tok = load_tokenizer(tokenizer_path(gguf))
    ids = tokenize(ds.texts, tok, 256)
    if vocab_size < len(tok):
        ids = [[i % vocab_size for i in row] for row in ids]
    n = rows or len(ids)
    return ids[:n], ds.labels[:n]


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def non_embedding_params(model) -> int:
    n = 0
    for name, p in model.named_parameters():
        if "embed" in name or "score" in name or "lora_" in name:
            continue
        n += p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
    return n


def summarise(step_log: list, warmup: int, n_params: int) -> dict:
    """Throughput over the optimizer steps after ``warmup`` (step_log: (end time, rows, real, padded) per step)."""
    steps = step_log[warmup:]
    if len(steps) < 2:
        raise RuntimeError(f"need more than {warmup + 1} steps to measure, got {len(step_log)}")
    seconds = steps[-1][0] - steps[0][0]
    rows = sum(s[1] for s in steps[1:])
    real = sum(s[2] for s in steps[1:])
    padded = sum(s[3] for s in steps[1:])
    out = {"steps_timed": len(steps) - 1, "seconds": round(seconds, 3), "samples_per_s": rows / seconds,
           "real_tokens_per_s": real / seconds, "padding_fraction": 1 - real / padded,
           "s_per_step": seconds / (len(steps) - 1), "non_embedding_params": n_params}
    peak = peak_tflops()
    out["mfu"] = 4 * n_params * out["real_tokens_per_s"] / (peak * 1e12) if peak else None
    return out


def rss_peak_gib() -> float:
    """Peak resident memory of this process (the memory figure on a CPU; on Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gpu_peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------- workers
def run_reference(path: str, ids, labels, steps: int, warmup: int, epochs: float | None = None,
                  val=None) -> dict:
    """The reference notebook's recipe, reproduced with HF Trainer."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig, Trainer,
                              TrainerCallback, TrainingArguments)

    from train.model import load_tokenizer

    tok = load_tokenizer(path)
    config = AutoConfig.from_pretrained(path)
    # fp16 as the reference on a GPU; fp32 on the CPU, where fp16 matmuls are emulated (~20x slower) and the
    # Trainer has no fp16 mixed precision anyway.
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=labels.shape[1], problem_type="multi_label_classification", quantization_config=bnb,
        dtype=dtype, device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"},
        attn_implementation="eager" if config.model_type == "gemma2" else "sdpa")
    model.config.pad_token_id = tok.pad_token_id
    n_params = non_embedding_params(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    n_layers = config.num_hidden_layers
    layers_from = min(REF_LAYERS_FROM.get(config.model_type, 0), n_layers // 2)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"],
                      layers_to_transform=list(range(layers_from, n_layers)), task_type=TaskType.SEQ_CLS)
    model = get_peft_model(model, lcfg)
    rows = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": [float(v) for v in y]}
            for x, y in zip(ids, labels)]
    counts = {"real": 0, "padded": 0}
    step_log: list = []

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
               "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.float32)}
        for i, b in enumerate(batch):
            out["input_ids"][i, :len(b["input_ids"])] = torch.tensor(b["input_ids"])
            out["attention_mask"][i, :len(b["input_ids"])] = 1
        counts["real"] += int(out["attention_mask"].sum())
        counts["padded"] += out["attention_mask"].numel()
        return out

    class Timer(TrainerCallback):
        last = (0, 0)

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            real, padded = counts["real"] - self.last[0], counts["padded"] - self.last[1]
            self.last = (counts["real"], counts["padded"])
            step_log.append((time.perf_counter(), 4, real, padded))

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=2e-4,
            fp16=torch.cuda.is_available(), optim="adamw_8bit" if torch.cuda.is_available() else "adamw_torch",
            max_steps=-1 if epochs else steps + warmup + 1, num_train_epochs=epochs or 1, warmup_steps=0.1,
            lr_scheduler_type="linear", save_strategy="no", report_to=[], logging_steps=50, seed=42,
            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Timer()])
        trainer.train()
    out = {"recipe": "reference", "peak_gib": gpu_peak_gib(), "rss_gib": rss_peak_gib(),
           **summarise(step_log, warmup if not epochs else 1, n_params)}
    if val is not None:
        from train.loop import predict_probs

        out["val_probs"] = predict_probs(model, val[0], tok.pad_token_id, 64, dtype).tolist()
    return out


def part_lora_layers(model_key: str, overrides: list[str], layers: tuple[int, int]) -> list[int]:
    """The config's LoRA layers that fall in ``[start, stop)``, renumbered from 0 (one device's part)."""
    from train.config import RunConfig

    lora = RunConfig.from_yaml(CONFIGS[model_key], [*CONFIG_OVERRIDES.get(model_key, []), *overrides]).lora
    n_layers = SHAPES[model_key]["num_hidden_layers"]
    full = lora.layers_to_transform if lora.layers_to_transform is not None else range(lora.layers_from or 0, n_layers)
    return [i - layers[0] for i in full if layers[0] <= i < layers[1]]


def run_toolkit(path: str, model_key: str, ids, labels, steps: int, warmup: int, t4: bool,
                epochs: int | None = None, val=None, overrides: list[str] | None = None,
                layers: tuple[int, int] | None = None) -> dict:
    """The toolkit's loop; with ``layers``, on that part of the model only (one device's share of a split)."""
    import torch

    from train.config import RunConfig
    from train.loop import DistEnv, fit_fold
    from train.model import apply_lora, load_classifier

    over = [f"model.name_or_path={path}", "train.save_every_steps=0", "cv.folds=[0]",
            *CONFIG_OVERRIDES.get(model_key, []), *(overrides or [])]
    if t4:
        over.append("model.dtype=float16")
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, 15 * 2**30 / total))
    if epochs:
        over.append(f"train.num_epochs={epochs}")
    else:
        over.append(f"train.max_steps={steps + warmup + 1}")
    upstream_lora = False
    if layers is not None:
        part = part_lora_layers(model_key, overrides or [], layers)
        if not part:
            raise RuntimeError(f"layers {layers[0]}-{layers[1] - 1} hold no LoRA layer: nothing to measure")
        over.append(f"lora.layers_to_transform={part}")
        upstream_lora = bool(part_lora_layers(model_key, overrides or [], (0, layers[0])))
    cfg = RunConfig.from_yaml(CONFIGS[model_key], over)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = DistEnv(device=device)
    model, tok, dtype = load_classifier(path, labels.shape[1], cfg.model, cfg.quantization, device, seed=42)
    n_params = non_embedding_params(model)
    model = apply_lora(model, cfg.lora, cfg.train.grad_checkpointing)
    if upstream_lora:
        # In the split, this part's input comes from LoRA layers on the device before: its gradient is computed.
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    if val is None:  # speed only: train on all rows, evaluate a token fold of 8 rows
        fold_of_row = (np.arange(len(ids)) >= 8).astype(np.int64)
        all_ids, all_labels = ids, labels
    else:
        all_ids, all_labels = ids + val[0], np.concatenate([labels, val[1]])
        fold_of_row = np.r_[np.ones(len(ids), dtype=np.int64), np.zeros(len(val[0]), dtype=np.int64)]
    with tempfile.TemporaryDirectory() as tmp:
        res = fit_fold(cfg, 0, model, tok, dtype, all_ids, all_labels, fold_of_row, Path(tmp), env,
                       save_adapter=lambda *a: None, log=log)
    out = {"recipe": "toolkit-t4" if t4 else "toolkit", "layers": layers, "peak_gib": gpu_peak_gib(), "rss_gib": rss_peak_gib(),
           "dtype": str(dtype),
           "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
           "grad_checkpointing": cfg.train.grad_checkpointing,
           **summarise(res["step_log"], warmup if not epochs else 1, n_params)}
    if val is not None:
        out["val_probs"] = res["probs"].tolist()
    return out


def worker(args) -> None:
    from transformers import AutoConfig

    path = args.model_path
    ids, labels = dls_tokens(args.data, args.gguf, AutoConfig.from_pretrained(path).vocab_size)
    val = None
    if args.quality:
        from train.data import make_folds

        fold = make_folds(labels, 5, 42)
        tr, va = np.flatnonzero(fold != args.fold), np.flatnonzero(fold == args.fold)
        val = ([ids[i] for i in va], labels[va])
        ids, labels = [ids[i] for i in tr], labels[tr]
    else:
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(ids))
        ids, labels = [ids[i] for i in perm], labels[perm]
    if args.worker == "reference":
        out = run_reference(path, ids, labels, args.steps, args.warmup, args.epochs if args.quality else None, val)
    elif args.worker.startswith("split-"):  # one device's part of train.parallel=split, in the T4 profile
        layers = tuple(int(x) for x in args.layers.split("-"))
        out = run_toolkit(path, args.model, ids, labels, args.steps, args.warmup, True, None, None, args.set,
                          layers=(layers[0], layers[1]))
        out["recipe"] = args.worker
    else:
        out = run_toolkit(path, args.model, ids, labels, args.steps, args.warmup, args.worker == "toolkit-t4",
                          args.epochs if args.quality else None, val, args.set)
    if val is not None:
        from infer.metrics import scores
        from infer.thresholds import cascade, threshold

        probs = np.asarray(out["val_probs"])
        out["val_t0.5"] = scores(val[1], threshold(probs))
        out["val_cascade"] = scores(val[1], cascade(probs))
        out["fold"], out["val_rows"] = args.fold, va.tolist()
    out["model"] = args.model
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- orchestrator
def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def run_worker(args, model: str, recipe: str, path: str, fold: int, extra: list[str] | None = None) -> dict:
    """One measurement in its own process (clean peak memory); its RESULT line, or the error it ended with."""
    cmd = [sys.executable, "-m", "train.bench", "--worker", recipe, "--model", model, "--model-path", path,
           "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--epochs", str(args.epochs), "--fold", str(fold)] + (["--quality"] if args.quality else [])
    cmd += extra or []
    cmd += [x for s in args.set for x in ("--set", s)] + (["--gguf", args.gguf] if args.gguf else [])
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    log(f"== {model} / {recipe}" + (f" / fold {fold}" if args.quality else ""))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
        if line is None:
            tail = proc.stderr.strip().splitlines()[-3:]
            res = {"model": model, "recipe": recipe, "error": " | ".join(tail) or f"exit {proc.returncode}"}
        else:
            res = json.loads(line[len("RESULT "):])
    except subprocess.TimeoutExpired:
        res = {"model": model, "recipe": recipe, "error": f"timed out after {args.timeout}s"}
    res["wall_s"] = round(time.time() - t0, 1)
    log(json.dumps({k: v for k, v in res.items() if k not in ("val_probs", "val_rows")}))
    return res


def run_split(args, model: str) -> list[dict]:
    """``train.parallel: split`` measured on one GPU: each device's part of the model (its layers, the embedding on
    the first, the head on the last) trained on its own in the T4 profile, so each peak is that device's peak."""
    plan = split_plan(model, args.split_devices, args.split_gib)
    log(f"{model} on {args.split_devices} x {args.split_gib:g} GiB: layers per device {plan}")
    out = []
    for d, (start, stop) in enumerate(plan):
        path = build_shape(model, args.gguf, Path(args.shapes_dir), layers=(start, stop))
        try:
            res = run_worker(args, model, f"split-{d}", path, 0, ["--layers", f"{start}-{stop}"])
        finally:
            shutil.rmtree(path, ignore_errors=True)  # 27B parts are ~30 GB each in bf16: don't fill the disk
        res["layers"] = [start, stop]
        out.append(res)
    return out


def _fold_file(args, model: str, recipe: str, fold: int) -> Path | None:
    return Path(args.out_oof) / "folds" / f"{model}_{recipe}_fold{fold}.json" if args.quality and args.out_oof else None


def _fold_settings(args) -> dict:
    return {"epochs": args.epochs, "data": str(Path(args.data).resolve()), "set": list(args.set)}


def keep_fold(args, res: dict) -> None:
    """--quality --out-oof: each finished fold of a recipe (its held-out probabilities too) is written as it ends,
    so that a run cut short (hours on a CPU) goes on where it stopped when started again with the same --out-oof."""
    path = _fold_file(args, res["model"], res["recipe"], res.get("fold", 0))
    if path is not None and "error" not in res:
        from infer.io import write_json

        write_json(path, {"settings": _fold_settings(args), "result": res})


def kept_fold(args, model: str, recipe: str, fold: int) -> dict | None:
    """The result of a fold written by an earlier run with the same settings, else None (an error if the file was
    made with other settings: the out-of-fold scores would mix two experiments)."""
    path = _fold_file(args, model, recipe, fold)
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != _fold_settings(args):
        raise SystemExit(f"error: {path} was made with other settings ({saved['settings']} vs "
                         f"{_fold_settings(args)}); delete it or pick another --out-oof")
    log(f"== {model} / {recipe} / fold {fold}: kept from {path} (delete it to run it again)")
    return saved["result"]


def out_of_fold(args, results: list, models: list, profiles: list, folds: list) -> None:
    """Each recipe's held-out probabilities over all the folds run, scored together (and written with --out-oof)."""
    import pandas as pd

    from infer.io import write_probs, write_text
    from infer.metrics import scores
    from infer.thresholds import cascade, threshold
    from train.config import DataArgs
    from train.data import make_folds, read_csv

    ds = read_csv(args.data, DataArgs(train_csv=args.data))
    if args.out_oof:  # the split, as a run's folds.csv: `infer tune/blend --folds` use the same folds
        folds_csv = pd.DataFrame({"index": ds.ids, "fold": make_folds(ds.labels, 5, 42)}).to_csv(index=False)
        write_text(Path(args.out_oof) / "folds.csv", folds_csv)
    print(f"\nout of fold ({len(folds)} folds: {','.join(map(str, folds))}; {args.epochs} epoch(s), same split and seed)")
    for m in models:
        for prof in profiles:
            runs = [r for r in results if r["model"] == m and r["recipe"] == prof and "error" not in r]
            if len(runs) != len(folds):
                print(f"{m:<12} {prof:<11} incomplete: {len(runs)} of {len(folds)} folds ran")
                continue
            rows = np.concatenate([r["val_rows"] for r in runs])
            probs = np.concatenate([np.asarray(r["val_probs"]) for r in runs])
            at5, cas = scores(ds.labels[rows], threshold(probs)), scores(ds.labels[rows], cascade(probs))
            print(f"{m:<12} {prof:<11} {len(rows)} rows: exact match {at5['exact_match']:.4f} @0.5, "
                  f"{cas['exact_match']:.4f} cascade; micro-F1 {cas['micro_f1']:.4f}, macro-F1 {cas['macro_f1']:.4f}")
            if args.out_oof:
                order = np.argsort(rows)
                write_probs(Path(args.out_oof) / f"{m}_{prof}_oof.csv", ds.ids[rows[order]], probs[order],
                            ds.label_names, meta={"recipe": prof, "model": m, "folds": folds, "epochs": args.epochs,
                                                    "scores_t0.5": at5, "scores_cascade": cas})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="default: embedded,gemma-2-9b (--quality: embedded)")
    p.add_argument("--profiles", default="reference,toolkit,toolkit-t4")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--data", default=DLS)
    p.add_argument("--gguf", default=None, help="the Gemma 3 270M GGUF (default: the registry package)")
    p.add_argument("--tokenizer", default=None, help="folder with the Gemma tokenizer (default: the embedded model's)")
    p.add_argument("--shapes-dir", default=os.path.join(tempfile.gettempdir(), "qlml-bench-shapes"))
    p.add_argument("--quality", action="store_true", help="held-out accuracy, reference vs toolkit (real 270M)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--folds", default="0", help="--quality: folds of the 5-fold split to train and score")
    p.add_argument("--out-oof", default=None, help="--quality: write each recipe's out-of-fold probabilities here "
                                                   "(and each finished fold: run again to go on where it stopped)")
    p.add_argument("--split-devices", type=int, default=2, help="toolkit-split: number of GPUs to split over")
    p.add_argument("--split-gib", type=float, default=15.0, help="toolkit-split: memory of each GPU (T4: 15)")
    p.add_argument("--fold", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--layers", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--set", action="append", default=[], help="override the toolkit config (KEY=VALUE)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per measurement")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global TOKENIZER_DIR
    TOKENIZER_DIR = args.tokenizer
    if args.worker:
        worker(args)
        return 0

    import torch

    from train.config import RunConfig

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    models = (args.models or ("embedded" if args.quality else "embedded,gemma-2-9b")).split(",")
    folds = [int(f) for f in args.folds.split(",")] if args.quality else [0]
    profiles = ["reference", "toolkit"] if args.quality else args.profiles.split(",")
    results = []
    for m in models:
        # A model whose config splits it over GPUs (27B) does not fit one T4 by design: its T4 profile is the split.
        split = m in SHAPES and RunConfig.from_yaml(CONFIGS[m]).train.parallel == "split"
        profs = ["toolkit-split" if p == "toolkit-t4" and split else p for p in profiles]
        path = None
        for fold in folds:  # fold by fold: an interrupted --quality run still has its finished folds paired
            for prof in profs:
                if prof == "toolkit-split":
                    results.extend(run_split(args, m))
                    continue
                kept = kept_fold(args, m, prof, fold)
                if kept is not None:
                    results.append(kept)
                    continue
                if path is None:
                    path = embedded_path(args.gguf) if m == "embedded" else build_shape(m, args.gguf,
                                                                                       Path(args.shapes_dir))
                results.append(run_worker(args, m, prof, path, fold))
                keep_fold(args, results[-1])

    timing = f"{args.epochs} epoch(s) per fold" if args.quality else f"timed steps: {args.steps} after {args.warmup}"
    print(f"\ndevice: {device}   date: {time.strftime('%Y-%m-%d')}   {timing}")
    head = (f"{'model':<12} {'recipe':<11} {'samples/s':>9} {'tokens/s':>9} {'pad':>5} {'peak GiB':>8} {'RSS GiB':>7} "
            f"{'MFU':>6} {'x ref':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['model']:<12} {r['recipe']:<11} ERROR {r['error'][:150]}")
            continue
        ref = next((x for x in results if x["model"] == r["model"] and x["recipe"] == "reference"
                    and x.get("fold") == r.get("fold") and "error" not in x), None)
        part = r["recipe"].startswith("split-")  # a part's own speed is not the model's: see the split line
        ratio = r["samples_per_s"] / ref["samples_per_s"] if ref and not part else None
        print(f"{r['model']:<12} {r['recipe']:<11} {r['samples_per_s']:>9.2f} {r['real_tokens_per_s']:>9.0f} "
              f"{r['padding_fraction']:>5.2f} {fmt(r['peak_gib']):>8} {fmt(r.get('rss_gib')):>7} "
              f"{fmt(r['mfu'], '.2%'):>6} {fmt(ratio):>6}")
        if "val_cascade" in r:
            print(f"{'':<24} fold-{r['fold']} exact match: {r['val_t0.5']['exact_match']:.4f} @0.5, "
                  f"{r['val_cascade']['exact_match']:.4f} cascade; micro-F1 {r['val_cascade']['micro_f1']:.4f}")
    for m in models:
        parts = [r for r in results if r["model"] == m and r["recipe"].startswith("split-")]
        if parts and all("error" not in r for r in parts):
            ref = next((x for x in results if x["model"] == m and x["recipe"] == "reference" and "error" not in x),
                       None)
            rows = parts[0]["micro_batch_size"] * parts[0]["grad_accum_steps"]
            speed = rows / sum(r["s_per_step"] for r in parts)
            peaks = ", ".join(f"GPU {i} (layers {r['layers'][0]}-{r['layers'][1] - 1}"
                              f"{' + embedding' if i == 0 else ''}{' + head' if i == len(parts) - 1 else ''}) "
                              f"{fmt(r['peak_gib'])} GiB" for i, r in enumerate(parts))
            print(f"{m} split over {len(parts)} GPUs, T4 profile: peak {peaks}; {speed:.2f} samples/s run one "
                  f"device after the other" + (f" ({speed / ref['samples_per_s']:.2f}x reference)" if ref else ""))
    if args.quality and len(folds) > 1:
        out_of_fold(args, results, models, profiles, folds)
    for r in results:
        r.pop("val_probs", None)
        r.pop("val_rows", None)
    if args.out:
        from infer.io import write_json

        write_json(args.out, {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                              "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
