"""The reference notebook's recipe, reproduced with HF Trainer: the baseline every toolkit figure is a ratio to.

micro-batch 2, grad-accum 2, fp16 (fp32 on a CPU), LoRA r16 on q/k/v of the upper layers, gradient checkpointing via
``prepare_model_for_kbit_training``, random batch order, pad to longest, 8-bit AdamW.
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
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

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
        from core.model import predict_probs

        out["val_probs"] = predict_probs(model, val[0], tok.pad_token_id, 64, dtype).tolist()
    return out
