"""Domain-adaptive pretraining (DAPT): continue pretraining the base model with a LoRA adapter on the causal-LM
objective (next-token cross-entropy) over unlabelled in-domain text, then start classification fine-tuning from it.

Usage:
    python -m train dapt --config configs/gemma-3-270m/dapt.yaml --corpus ../shared/data/dls/test.csv [--resume]
    python -m train dapt --corpus a.csv,b.csv --out adapters/dapt --set train.max_steps=100 --eval-rows 256
    python -m train --config configs/gemma-3-270m/qlora.yaml --set lora.init_adapter=adapters/dapt-gemma-3-270m

The corpus rows are formatted with ``data.text_template`` (what the classifier later sees; only the template's
columns are needed, labels and ids are ignored) and truncated to ``data.max_length`` tokens. The model, quantization
and lora sections are those of classification training (the classifier's ``lora`` section must match the adapter:
r, alpha, modules, layers), and of the train section DAPT uses lr, num_epochs, micro_batch_size, grad_accum_steps,
max_steps, scheduler, warmup_ratio, weight_decay, max_grad_norm, optimizer, group_by_length, grad_checkpointing,
save_every_steps, nan_guard_steps, eval_batch_size and seed. The output folder (``--out``, default the config's
``output_dir``) holds resumable checkpoints while the run goes on and, once it finishes, the LoRA adapter
(``adapter_model.safetensors``), the tokenizer, ``run_config.yaml`` and ``dapt_info.json`` (corpus, steps, losses,
versions). ``--eval-rows N`` holds N corpus rows out of training and reports their loss before and after.

Exit status: 0 on success, 2 on bad input (config, corpus, paths), 1 when training fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.adapter import base_model_id
from core.config import ConfigError, RunConfig, add_config_arguments
from core.data import collate, tokenize
from core.errors import TrainingError
from core.io import InputError, atomic_dir, versions, write_json, write_text
from core.model import autocast, load_causal_lm, load_tokenizer, resolve_model_path
from train import checkpoint
from train.checkpoint import Progress
from train.data import batch_order, read_corpus, split_paths
from train.engine import Callbacks, DistContext, Optimization, run_epochs, step_seed
from train.lora import apply_lora, count_parameters

CHECKPOINT = Path("checkpoint")
RUN_FILE = "dapt_run.json"
INFO_FILE = "dapt_info.json"
LOGIT_CHUNK_ELEMENTS = 2 ** 26
"""Logits computed at once (64M: 256 MiB in fp32, 256 tokens of Gemma's 262k vocabulary)."""

# Settings that do not change what a DAPT run computes: a resumed run may differ in these.
_RESUME_FREE = ("output_dir", "data.train_csv", "data.id_column", "data.label_prefix",
                "data.label_columns", "data.label_names_csv", "model.num_labels", "lora.init_adapter", "loss.",
                "cv.", "hub.", "distill.", "train.head_lr", "train.save_every_steps", "train.keep",
                "train.parallel", "train.eval_batch_size", "train.nan_guard_steps")


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------- loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``targets``, chunk by chunk.

    The gradient with respect to ``hidden`` (N x H, small) is computed in the forward pass, chunk by chunk, so that
    at most one chunk of logits (and its softmax, in place) exists at a time and nothing vocabulary-sized is kept
    for the backward pass or computed twice. The weight is frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, grad_enabled):
        need_grad = ctx.needs_input_grad[0] and grad_enabled
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i:i + chunk], targets[i:i + chunk]
            logits = F.linear(h.to(weight.dtype), weight, bias).float()
            if softcap:
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()                     # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0       # d loss / d logits
                if softcap:
                    probs.mul_(1.0 - tanh.square_())                          # through the soft-capping
                grad[i:i + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype) if grad is not None else None), None, None, None, None, None, None


def lm_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype,
                chunk_elements: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the real (non-pad) targets of a right-padded batch, and their count.

    The same as the model's own loss with pad labels set to -100, without materialising B x T x vocab logits: the
    decoder's hidden states are gathered at the positions whose next token is real, and the frozen LM head + softmax
    run on chunks of ``chunk_elements`` logits (default :data:`LOGIT_CHUNK_ELEMENTS`): see ``_LinearCrossEntropy``.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()) or not isinstance(head, torch.nn.Linear):
        raise InputError("lora.target_modules must not adapt the LM head in DAPT (it is not part of the classifier)")
    device = lm.get_input_embeddings().weight.device
    with autocast(device, dtype):
        hidden = lm.get_decoder()(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device)).last_hidden_state
    hidden = hidden.to(head.weight.device)  # layers split over GPUs (train.parallel=split)
    keep = attention_mask[:, 1:].bool().to(hidden.device)
    hidden = hidden[:, :-1][keep]
    targets = input_ids.to(hidden.device)[:, 1:][keep]
    chunk = max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // head.weight.shape[0])
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    loss = _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, softcap, chunk, torch.is_grad_enabled())
    return loss, int(targets.numel())


@torch.no_grad()
def corpus_loss(model, token_ids: list[list[int]], pad_id: int, batch_size: int, dtype: torch.dtype) -> float:
    """Mean next-token cross-entropy per token over ``token_ids`` (dropout off)."""
    was_training = model.training
    model.eval()
    order = np.argsort([-len(t) for t in token_ids], kind="stable")
    total, n = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([token_ids[i] for i in order[start:start + batch_size]], pad_id)
        loss, k = lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], dtype)
        total, n = total + loss.item(), n + k
    model.train(was_training)
    return total / max(n, 1)


# -------------------------------------------------------------------------------------------------------- the run


def check_out_dir(out: Path, resume: bool) -> bool:
    """Refuse to mix runs; returns True when ``out`` already holds the finished adapter (and ``resume`` is set)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    used = out.is_dir() and any(out.iterdir())
    finished = (out / INFO_FILE).is_file()
    if used and not resume:
        what = "a finished DAPT adapter" if finished else "a run"
        raise InputError(f"--out {out} already holds {what}; pass --resume to continue it, or choose another --out")
    if used and not (finished or (out / RUN_FILE).is_file() or checkpoint.exists(out / CHECKPOINT)):
        # The finished adapter replaces the folder: never a folder holding something else.
        raise InputError(f"--out {out} is not empty and holds no DAPT run to resume; choose another --out")
    return finished


def main_run(cfg: RunConfig, corpus_paths: list[str], out: str | Path, resume: bool = False, eval_rows: int = 0,
             log=log, callbacks: Callbacks | None = None) -> dict:
    """Run DAPT (resuming from ``out/checkpoint`` with ``resume``); returns the contents of ``dapt_info.json``.

    An input error found after ``out`` was created removes it again if this call created it and no checkpoint was
    written, so that fixing the input and running the same command again works without ``--resume``.
    """
    out = Path(out)
    existed = out.exists()
    try:
        return _run(cfg, corpus_paths, out, resume, eval_rows, log, callbacks)
    except (ConfigError, InputError):
        if not existed and out.is_dir() and not checkpoint.exists(out / CHECKPOINT):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(cfg: RunConfig, corpus_paths: list[str], out: Path, resume: bool, eval_rows: int, log,
         callbacks: Callbacks | None = None) -> dict:
    t_start = time.time()
    t = cfg.train
    # 1. Validate inputs before anything is written.
    if cfg.lora.init_adapter:
        raise ConfigError("lora.init_adapter is for classification training (python -m train); DAPT starts "
                          "from a fresh LoRA adapter: unset it (--set lora.init_adapter=)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("python -m train dapt runs in one process (use several GPUs with train.parallel=split), "
                         "not under torchrun")
    if eval_rows < 0:
        raise InputError(f"--eval-rows must be >= 0, got {eval_rows}")
    corpus = read_corpus(corpus_paths, cfg.data.text_template)
    if check_out_dir(out, resume):
        info = json.loads((out / INFO_FILE).read_text())
        log(f"dapt: {out} already holds the finished adapter ({info['steps']} steps); nothing to do")
        return info
    model_path = resolve_model_path(cfg.model, log=log)
    tokenizer = load_tokenizer(model_path)
    token_ids = [ids for ids in tokenize(corpus.texts, tokenizer, cfg.data.max_length) if len(ids) >= 2]
    if not token_ids:
        raise InputError(f"the corpus ({', '.join(corpus_paths)}) has no row of 2 tokens or more")
    rng = np.random.default_rng(t.seed)
    perm = rng.permutation(len(token_ids))
    if eval_rows >= len(token_ids):
        raise InputError(f"--eval-rows {eval_rows} leaves no training rows of the corpus's {len(token_ids)}")
    eval_ids = [token_ids[i] for i in sorted(perm[:eval_rows])]
    train_ids = [token_ids[i] for i in sorted(perm[eval_rows:])]
    lengths = np.array([len(x) for x in train_ids])
    n_batches = math.ceil(len(train_ids) / t.micro_batch_size)
    steps_per_epoch = math.ceil(n_batches / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.num_epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    fingerprint = hashlib.sha256(json.dumps([train_ids, eval_ids]).encode()).hexdigest()
    run_info = {"config": cfg.to_dict(), "corpus": corpus.files, "eval_rows": eval_rows, "fingerprint": fingerprint}
    ckpt = out / CHECKPOINT
    if resume and (out / RUN_FILE).is_file():
        saved = json.loads((out / RUN_FILE).read_text())
        refused, _ = checkpoint.changes(RunConfig.from_dict(saved["config"]).to_dict(), run_info["config"],
                                        _RESUME_FREE)
        if refused:
            raise InputError(f"{out / RUN_FILE}: cannot resume: these settings change what the run computes: "
                             f"{checkpoint.describe(refused)} (put them back, or choose another --out)")
        if saved["fingerprint"] != fingerprint or saved["eval_rows"] != eval_rows:
            raise InputError(f"{out / RUN_FILE}: the corpus, data.text_template, data.max_length or --eval-rows "
                             f"changed since this run started (corpus then: {[f['path'] for f in saved['corpus']]})")
    log(f"dapt: {len(train_ids)} training rows ({int(lengths.sum())} tokens, median {int(np.median(lengths))}, max "
        f"{lengths.max()}, max_length {cfg.data.max_length}) from {', '.join(corpus_paths)}; {eval_rows} held out; "
        f"{total_steps} optimizer steps")

    # 2. The model: 4-bit causal LM + a fresh (seeded) LoRA adapter.
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device_map = "auto" if t.parallel == "split" and torch.cuda.device_count() > 1 else None
    model, tok, dtype = load_causal_lm(model_path, cfg.model, cfg.quantization, device, device_map=device_map)
    torch.manual_seed(t.seed)  # LoRA init
    model = apply_lora(model, cfg.lora, t.grad_checkpointing, task="causal_lm")
    params = count_parameters(model)
    log(f"dapt: {params['trainable']:,} trainable of {params['total']:,} parameters, "
        f"dtype {str(dtype).removeprefix('torch.')}, device {device}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_FILE).is_file():
        write_json(out / RUN_FILE, run_info)

    # 3. Train on the engine (resuming from the checkpoint if there is one).
    opt = Optimization(model, cfg, device, dtype, total_steps)
    fp = checkpoint.fingerprint(fingerprint, checkpoint.result_settings(cfg.to_dict(), _RESUME_FREE))
    resumed = checkpoint.exists(ckpt)
    if resumed:
        state = opt.load(ckpt, fp)
        log(f"dapt: resumed at epoch {state.epoch} step {state.step}/{total_steps}")
    else:
        state = Progress()
        if eval_ids:
            state.eval_loss_start = corpus_loss(model, eval_ids, tok.pad_token_id, t.eval_batch_size, dtype)
            log(f"dapt: held-out loss before training {state.eval_loss_start:.4f}")

    def epoch_steps(epoch: int) -> list:
        order = batch_order(lengths, t.micro_batch_size, seed=t.seed * 1000 + epoch, group_by_length=t.group_by_length)
        return [order[i:i + t.grad_accum_steps] for i in range(0, len(order), t.grad_accum_steps)]

    def train_step(g: int, micro_batches) -> float:
        step_tokens = sum(int(lengths[r] - 1) for rows in micro_batches for r in rows)
        loss_sum = 0.0
        for rows in micro_batches:
            batch = collate([train_ids[r] for r in rows], tok.pad_token_id)
            loss, _ = lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], dtype)
            opt.backward(loss / step_tokens)  # mean over the step's tokens
            loss_sum += loss.item()
        state.real_tokens += step_tokens
        state.losses.append(loss_sum / step_tokens)
        return loss_sum / step_tokens

    model.train()
    run_epochs(opt=opt, progress=state, num_epochs=t.num_epochs, total_steps=total_steps, epoch_steps=epoch_steps,
               train_step=train_step, end_epoch=None, save=lambda: opt.save(ckpt, state, fp), checkpoint_last=False,
               save_every_steps=t.save_every_steps, guard_steps=t.nan_guard_steps, dtype=dtype, what="dapt",
               seed_of_step=lambda step: step_seed(t.seed, 0, step, 0), dist=DistContext(),
               grad_accum_steps=t.grad_accum_steps, resumed=resumed, callbacks=callbacks, desc="dapt")

    # 4. The adapter folder, atomically (it replaces the checkpoint).
    eval_end = corpus_loss(model, eval_ids, tok.pad_token_id, t.eval_batch_size, dtype) if eval_ids else None
    losses = state.losses
    tail = losses[-max(1, len(losses) // 10):]
    info = {
        "kind": "dapt", "base_model": base_model_id(cfg), "model": cfg.model.name_or_path, "corpus": corpus.files,
        "rows": len(train_ids), "eval_rows": len(eval_ids), "tokens_seen": state.real_tokens,
        "steps": state.step, "steps_per_epoch": steps_per_epoch,
        "epochs": round(state.step / steps_per_epoch, 3),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "mean_loss": float(np.mean(losses)) if losses else None,
        "mean_loss_last_10pct": float(np.mean(tail)) if losses else None,
        "eval_loss_start": state.eval_loss_start, "eval_loss_end": eval_end,
        "train_seconds": round(state.train_seconds, 2),
        "seconds_per_step": round(state.train_seconds / state.step, 3) if state.step else None,
        "wall_seconds_this_call": round(time.time() - t_start, 1),
        "parameters": params, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "loss_history": [round(x, 5) for x in losses], "versions": versions(),
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_text(tmp / "run_config.yaml", cfg.to_yaml())
        write_json(tmp / INFO_FILE, info)
    msg = (f"dapt: {state.step} steps, loss {info['first_loss']:.4f} (first step) -> "
           f"{info['mean_loss_last_10pct']:.4f} (mean of the last {len(tail)}), "
           f"{info['seconds_per_step']} s/step")
    if eval_end is not None:
        msg += f"; held-out loss {state.eval_loss_start:.4f} -> {eval_end:.4f}"
    log(msg)
    log(f"wrote {out}: start classification training from it with --set lora.init_adapter={out}")
    return info


# ------------------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train dapt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--corpus", action="append", default=[], metavar="CSV[,CSV...]",
                   help="unlabelled CSV file(s) with the template's columns (repeatable, or comma-separated)")
    p.add_argument("--out", help="output folder (checkpoints, then the adapter); default: the config's output_dir")
    p.add_argument("--eval-rows", type=int, default=0, metavar="N",
                   help="hold N corpus rows out of training and report their loss before and after (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return p


def main(argv: list[str] | None = None, callbacks: Callbacks | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = RunConfig.from_yaml(args.config, args.overrides)
        out = args.out or cfg.output_dir
        cfg = dataclasses.replace(cfg, output_dir=str(out))
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        corpus = split_paths(args.corpus)
        main_run(cfg, corpus, out, resume=args.resume, eval_rows=args.eval_rows, callbacks=callbacks)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
