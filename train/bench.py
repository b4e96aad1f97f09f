"""Training speed and memory: the reference notebook's recipe vs the toolkit's default path, side by side.

Usage (one GPU; each measurement runs in its own process so peak memory is clean):
    python -m train.bench --models embedded,gemma-2-9b,mistral-7b,gemma-2-27b --steps 30
    python -m train.bench --models gemma-2-9b --profiles toolkit-t4          # only the T4 (15 GiB, fp16) profile
    python -m train.bench --quality --epochs 1                                # OOF exact match, fold 0, real 270M

Recipes:
  reference   HF Trainer, micro-batch 2, grad-accum 2, fp16, LoRA r16 on q/k/v of the upper layers, gradient
              checkpointing via prepare_model_for_kbit_training, random batch order, pad to longest, 8-bit AdamW.
  toolkit     the toolkit's training loop with the model's config (configs/<model>/qlora.yaml).
  toolkit-t4  the same, fp16, with the process capped at a T4's 15 GiB (torch.cuda.set_per_process_memory_fraction).
Models: ``embedded`` = real Gemma 3 270M; the others are random-weight checkpoints of the real shapes, built on the
GPU (weights don't change speed or memory). Token lengths are those of the DLS data under the Gemma tokenizer.
MFU estimate = 4 x non-embedding parameters x real tokens/s / peak dense TFLOP/s of the device (forward 2N +
backward through activations 2N; LoRA weight gradients and attention FLOPs ignored).
"""

from __future__ import annotations

import argparse
import json
import os
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


def build_shape(name: str, gguf: str | None, root: Path) -> str:
    """A random-weight checkpoint of a real shape (bf16, built on the GPU), with the Gemma 3 tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = root / name
    if (target / "config.json").is_file():
        return str(target)
    t0 = time.time()
    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_path(gguf)).save_pretrained(target)
    del model
    log(f"built random {name} in {time.time() - t0:.0f}s")
    return str(target)


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


def run_toolkit(path: str, model_key: str, ids, labels, steps: int, warmup: int, t4: bool,
                epochs: int | None = None, val=None, overrides: list[str] | None = None) -> dict:
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
    cfg = RunConfig.from_yaml(CONFIGS[model_key], over)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = DistEnv(device=device)
    model, tok, dtype = load_classifier(path, labels.shape[1], cfg.model, cfg.quantization, device, seed=42)
    n_params = non_embedding_params(model)
    model = apply_lora(model, cfg.lora, cfg.train.grad_checkpointing)
    if val is None:  # speed only: train on all rows, evaluate a token fold of 8 rows
        fold_of_row = (np.arange(len(ids)) >= 8).astype(np.int64)
        all_ids, all_labels = ids, labels
    else:
        all_ids, all_labels = ids + val[0], np.concatenate([labels, val[1]])
        fold_of_row = np.r_[np.ones(len(ids), dtype=np.int64), np.zeros(len(val[0]), dtype=np.int64)]
    with tempfile.TemporaryDirectory() as tmp:
        res = fit_fold(cfg, 0, model, tok, dtype, all_ids, all_labels, fold_of_row, Path(tmp), env,
                       save_adapter=lambda *a: None, log=log)
    out = {"recipe": "toolkit-t4" if t4 else "toolkit", "peak_gib": gpu_peak_gib(), "rss_gib": rss_peak_gib(),
           "dtype": str(dtype),
           "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
           "grad_checkpointing": cfg.train.grad_checkpointing,
           **summarise(res["step_log"], warmup if not epochs else 1, n_params)}
    if val is not None:
        out["val_probs"] = res["probs"].tolist()
    return out


def worker(args) -> None:
    path = args.model_path
    vocab = SHAPES.get(args.model, {}).get("vocab_size", 10**9)
    ids, labels = dls_tokens(args.data, args.gguf, vocab)
    val = None
    if args.quality:
        from train.data import make_folds

        fold = make_folds(labels, 5, 42)
        tr, va = np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
        val = ([ids[i] for i in va], labels[va])
        ids, labels = [ids[i] for i in tr], labels[tr]
    else:
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(ids))
        ids, labels = [ids[i] for i in perm], labels[perm]
    if args.worker == "reference":
        out = run_reference(path, ids, labels, args.steps, args.warmup, args.epochs if args.quality else None, val)
    else:
        out = run_toolkit(path, args.model, ids, labels, args.steps, args.warmup, args.worker == "toolkit-t4",
                          args.epochs if args.quality else None, val, args.set)
    if val is not None:
        from infer.metrics import scores
        from infer.thresholds import cascade, threshold

        probs = np.asarray(out.pop("val_probs"))
        out["val_t0.5"] = scores(val[1], threshold(probs))
        out["val_cascade"] = scores(val[1], cascade(probs))
    out["model"] = args.model
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- orchestrator
def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="embedded,gemma-2-9b")
    p.add_argument("--profiles", default="reference,toolkit,toolkit-t4")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--data", default=DLS)
    p.add_argument("--gguf", default=None, help="the Gemma 3 270M GGUF (default: the registry package)")
    p.add_argument("--tokenizer", default=None, help="folder with the Gemma tokenizer (default: the embedded model's)")
    p.add_argument("--shapes-dir", default=os.path.join(tempfile.gettempdir(), "qlml-bench-shapes"))
    p.add_argument("--quality", action="store_true", help="fold-0 accuracy, real 270M, reference vs toolkit")
    p.add_argument("--epochs", type=int, default=1)
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

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    models = ["embedded"] if args.quality else args.models.split(",")
    profiles = ["reference", "toolkit"] if args.quality else args.profiles.split(",")
    results = []
    for m in models:
        path = embedded_path(args.gguf) if m == "embedded" else build_shape(m, args.gguf, Path(args.shapes_dir))
        for prof in profiles:
            if prof == "toolkit-t4" and m == "gemma-2-27b":
                continue  # 27B does not fit one T4 by design: it is split over two (train.parallel=split)
            cmd = [sys.executable, "-m", "train.bench", "--worker", prof, "--model", m, "--model-path", path,
                   "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--epochs", str(args.epochs)] + (["--quality"] if args.quality else [])
            cmd += [x for s in args.set for x in ("--set", s)] + (["--gguf", args.gguf] if args.gguf else [])
            cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
            log(f"== {m} / {prof}")
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
                if line is None:
                    tail = proc.stderr.strip().splitlines()[-3:]
                    res = {"model": m, "recipe": prof, "error": " | ".join(tail) or f"exit {proc.returncode}"}
                else:
                    res = json.loads(line[len("RESULT "):])
            except subprocess.TimeoutExpired:
                res = {"model": m, "recipe": prof, "error": f"timed out after {args.timeout}s"}
            res["wall_s"] = round(time.time() - t0, 1)
            log(json.dumps(res))
            results.append(res)

    print(f"\ndevice: {device}   date: {time.strftime('%Y-%m-%d')}   timed steps: {args.steps} after {args.warmup}")
    head = (f"{'model':<12} {'recipe':<11} {'samples/s':>9} {'tokens/s':>9} {'pad':>5} {'peak GiB':>8} {'RSS GiB':>7} "
            f"{'MFU':>6} {'x ref':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['model']:<12} {r['recipe']:<11} ERROR {r['error'][:150]}")
            continue
        ref = next((x for x in results if x["model"] == r["model"] and x["recipe"] == "reference"
                    and "error" not in x), None)
        ratio = r["samples_per_s"] / ref["samples_per_s"] if ref else None
        print(f"{r['model']:<12} {r['recipe']:<11} {r['samples_per_s']:>9.2f} {r['real_tokens_per_s']:>9.0f} "
              f"{r['padding_fraction']:>5.2f} {fmt(r['peak_gib']):>8} {fmt(r.get('rss_gib')):>7} "
              f"{fmt(r['mfu'], '.2%'):>6} {fmt(ratio):>6}")
        if "val_cascade" in r:
            print(f"{'':<24} fold-0 exact match: {r['val_t0.5']['exact_match']:.4f} @0.5, "
                  f"{r['val_cascade']['exact_match']:.4f} cascade; micro-F1 {r['val_cascade']['micro_f1']:.4f}")
    if args.out:
        from infer.io import write_json

        write_json(args.out, {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                              "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
