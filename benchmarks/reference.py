"""HF Trainer recipes: the reference notebook's (the baseline every toolkit figure is a ratio to), and HF Trainer
given the toolkit's settings (``trainer-toolkit``: how much of the toolkit's gain is its settings, how much its loop).

reference        micro-batch 2, grad-accum 2, fp16 (fp32 on a CPU), LoRA r16 on q/k/v of the upper layers, gradient
                 checkpointing via ``prepare_model_for_kbit_training``, random batch order, pad to longest, 8-bit
                 AdamW.
trainer-toolkit  the toolkit config's model load (compute dtype, attention, fp32 residual in fp16), LoRA (modules,
                 layers, fp32 trainable weights, ``score`` head), micro-batch x grad-accum, gradient checkpointing
                 setting (off for the 9B: no ``prepare_model_for_kbit_training`` upcast either), optimizer and LR
                 schedule (the toolkit's own objects, head LR included), length-grouped batches
                 (``group_by_length``), pad to longest in the batch; but HF Trainer's loop, sampler and loss (the
                 model's BCE; the toolkit's ``max_tokens_per_micro_batch`` pieces have no Trainer equivalent).
                 HF's length-grouped sampler puts the longest batch first: its peak memory is the epoch's worst case
                 from the first step, while the toolkit's over a few steps is that of the batches it drew (on the
                 CPU, 270M shape, 4 steps: RSS 6.3 vs 3.5 GiB). Compare peaks over whole epochs, or read them so.
"""

from __future__ import annotations

import tempfile
import time

from benchmarks.measure import gpu_peak_gib, non_embedding_params, rss_peak_gib, summarise

REF_LAYERS_FROM = {"gemma2": 16, "mistral": 8}
"""The reference adapts the upper layers only (16+ of the 9B's 42; 8+ of Mistral's 32)."""


def run_reference(path: str, ids, labels, steps: int, warmup: int, epochs: float | None = None,
                  val=None) -> dict:
    """The reference notebook's recipe, reproduced with HF Trainer."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig, TrainingArguments

    from core.model import load_tokenizer

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
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=2e-4,
            fp16=torch.cuda.is_available(), optim="adamw_8bit" if torch.cuda.is_available() else "adamw_torch",
            max_steps=-1 if epochs else steps + warmup + 1, num_train_epochs=epochs or 1, warmup_steps=0.1,
            lr_scheduler_type="linear", save_strategy="no", report_to=[], logging_steps=50, seed=42,
            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
        step_log = _train(model, targs, tok, ids, labels)
    out = {"recipe": "reference", "peak_gib": gpu_peak_gib(), "rss_gib": rss_peak_gib(),
           **summarise(step_log, warmup if not epochs else 1, n_params)}
    if val is not None:
        from core.model import predict_probs

        out["val_probs"] = predict_probs(model, val[0], tok.pad_token_id, 64, dtype).tolist()
    return out


def run_trainer_toolkit(path: str, model_key: str, ids, labels, steps: int, warmup: int,
                        overrides: list[str] | None = None) -> dict:
    """HF Trainer given the toolkit's settings (see the module docstring): only the training loop differs."""
    import dataclasses

    import torch
    from transformers import TrainingArguments

    from benchmarks.shapes import CONFIG_OVERRIDES, CONFIGS
    from core.config import RunConfig
    from core.model import load_classifier
    from train.lora import apply_lora
    from train.optim import build_optimizer, build_scheduler

    cfg = RunConfig.from_yaml(CONFIGS[model_key], [f"model.name_or_path={path}", *CONFIG_OVERRIDES.get(model_key, []),
                                                   *(overrides or [])])
    t = cfg.train
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model, tok, dtype = load_classifier(path, labels.shape[1], cfg.model, cfg.quantization, device, seed=42)
    n_params = non_embedding_params(model)
    model = apply_lora(model, cfg.lora, t.grad_checkpointing)
    total = steps + warmup + 1
    optimizer = build_optimizer(model, cfg, device)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers renamed group_by_length=True to train_sampling_strategy="group_by_length" (5.x); either works.
    grouping = {"group_by_length": True} if "group_by_length" in fields else \
        {"train_sampling_strategy": "group_by_length"}
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.grad_accum_steps, learning_rate=t.lr, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, fp16=device.type == "cuda" and dtype == torch.float16,
            bf16=dtype == torch.bfloat16,  # the Trainer's autocast, on a GPU or a CPU with native bf16
            gradient_checkpointing=False,  # apply_lora has set the config's
            max_steps=total, save_strategy="no", report_to=[], logging_steps=50, seed=t.seed,
            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, **grouping)
        step_log = _train(model, targs, tok, ids, labels,
                          optimizers=(optimizer, build_scheduler(optimizer, cfg, total)))
    return {"recipe": "trainer-toolkit", "peak_gib": gpu_peak_gib(), "rss_gib": rss_peak_gib(), "dtype": str(dtype),
            "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
            "grad_checkpointing": t.grad_checkpointing, "optimizer": type(optimizer).__name__,
            **summarise(step_log, warmup, n_params)}


def _train(model, targs, tok, ids, labels, optimizers=(None, None)) -> list:
    """HF Trainer on the token ids (padded to the longest in each batch); its (end time, rows, real, padded) per
    optimizer step."""
    import torch
    from transformers import Trainer, TrainerCallback

    rows = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": [float(v) for v in y]}
            for x, y in zip(ids, labels)]
    counts = {"rows": 0, "real": 0, "padded": 0}
    step_log: list = []

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
               "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.float32)}
        for i, b in enumerate(batch):
            out["input_ids"][i, :len(b["input_ids"])] = torch.tensor(b["input_ids"])
            out["attention_mask"][i, :len(b["input_ids"])] = 1
        counts["rows"] += len(batch)
        counts["real"] += int(out["attention_mask"].sum())
        counts["padded"] += out["attention_mask"].numel()
        return out

    class Timer(TrainerCallback):
        last = (0, 0, 0)

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = (counts["rows"], counts["real"], counts["padded"])
            step_log.append((time.perf_counter(), *(a - b for a, b in zip(now, self.last))))
            self.last = now

    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Timer()],
                      optimizers=optimizers)
    trainer.train()
    return step_log
