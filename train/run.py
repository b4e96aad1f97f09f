"""Cross-validated classification training, the recipe behind ``python -m train``.

Read top to bottom, :func:`train_cv` validates every input before anything is written, writes the run folder, then
trains fold after fold (:func:`train_fold`: the 4-bit model with LoRA and a score head, then the step loop of
:func:`fit`: batch, forward, loss, backward, clip + optimizer step + LR schedule, checkpoint; at each epoch's end
evaluation on the held-out fold and the ``last`` / ``best`` adapters), and ends with the out-of-fold probabilities
and the summary (:func:`train.summary.write_summary`). In a distilled run, :class:`train.distill.Distillation` hands
it the soft targets of each fold; the final model on every row (``cv.final``, plain or distilled) is its own call
(:func:`train_final`), its thresholds tuned on the out-of-fold probabilities (:func:`tune_final`).

The parts below it: :mod:`train.data` (folds, batch order), :mod:`train.lora`, :mod:`train.loss`,
:mod:`train.optim` (optimizer, schedule), :mod:`train.checkpoint`, :mod:`train.dist` (torchrun),
:mod:`train.evaluation`, :mod:`train.run_dir` (what a resume may change) and :mod:`train.summary`. The command line:
:mod:`train.commands.cv`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.adapter import FINAL_ADAPTER, FINAL_DIR, save_adapter
from core.config import RunConfig
from core.data import Dataset, collate, read_csv, read_label_descriptions, tokenize
from core.decoding import THRESHOLDS_FILE
from core.errors import ConfigError, InputError, TrainingError
from core.io import atomic_path, write_json
from core.model import autocast, input_device, load_classifier, load_tokenizer, predict_probs, resolve_model_path
from core.thresholds import ThresholdSpec
from train import checkpoint, curves, tracking
from train.callbacks import Callbacks
from train.checkpoint import Progress, step_seed
from train.data import TrainingLabels, batch_order, make_folds, rank_steps, read_training_labels, split_by_tokens
from train.dist import DistEnv, allreduce_grads, broadcast_trainable, check_finite, device_map_for, setup_dist
from train.distill import Distillation, SoftTargets
from train.evaluation import evaluate, fold_decoding, selection_key
from train.head_init import init_score_head
from train.lora import apply_lora, count_parameters
from train.loss import distill_loss, multilabel_loss, pos_weight_from_labels
from train.optim import Optimization
from train.run_dir import (
    BackgroundPush,
    check_resume,
    check_run_dir,
    launch_info,
    run_fingerprint,
    write_run_files,
)
from train.summary import write_summary

logger = logging.getLogger(__name__)


@dataclass
class Rows:
    """The rows the models of a run train on: the labelled rows, then (distillation) the unlabelled ones."""

    token_ids: list[list[int]]
    labels: np.ndarray
    """rows x classes 0/1 trained on (zeros on unlabelled rows; ``data.train_labels_csv``'s where it is set)."""
    fold_of_row: np.ndarray
    """The fold of each row; -1: in no fold (an unlabelled row is trained on in every fold, never evaluated)."""
    scored_labels: np.ndarray | None = None
    """The labels a held-out row is scored on: ``data.train_csv``'s (None: ``labels``)."""
    trained: np.ndarray | None = None
    """False on the rows trained on in no fold (absent from ``data.train_labels_csv``); None: every row is."""

    def __post_init__(self):
        self.scored_labels = self.labels if self.scored_labels is None else self.scored_labels
        self.trained = np.ones(len(self.token_ids), dtype=bool) if self.trained is None else self.trained

    def train_on(self, tl: TrainingLabels) -> Rows:
        """These rows trained on ``data.train_labels_csv`` (its labels, only its rows), still scored as before."""
        labels, trained = self.labels.copy(), self.trained.copy()
        labels[:len(tl.labels)], trained[:len(tl.trained)] = tl.labels, tl.trained  # the labelled rows come first
        return Rows(self.token_ids, labels, self.fold_of_row, self.scored_labels, trained)


@dataclass
class Fold:
    """One model to train: a cross-validation fold, or the final model (every row, nothing held out)."""

    index: int
    """The fold; seeds the head init, the dropout and the checkpoint (the final model: ``cv.n_folds``)."""
    name: str
    """In messages and progress bars: ``fold 2``, ``final student``."""
    folder: Path
    train_idx: np.ndarray
    """Positions in :class:`Rows` trained on."""
    val_idx: np.ndarray
    """Positions in :class:`Rows` held out and evaluated after each epoch (none for the final model)."""
    targets: SoftTargets | None = None
    """Distillation: the teachers' soft targets over the rows."""
    adapter_info: dict = field(default_factory=dict)
    """What each adapter's ``adapter_info.json`` says about the model (``fold``; ``final``)."""

    @classmethod
    def cv(cls, k: int, rows: Rows, folder: Path, targets: SoftTargets | None = None) -> Fold:
        """Fold ``k``: trained on every row outside it (that is trained on at all), evaluated on its own rows."""
        return cls(k, f"fold {k}", folder, train_idx=np.flatnonzero((rows.fold_of_row != k) & rows.trained),
                   val_idx=np.flatnonzero(rows.fold_of_row == k), targets=targets, adapter_info={"fold": k})


@dataclass
class FoldProgress(Progress):
    """Where a fold's training is (saved with every checkpoint)."""

    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    step_log: list = field(default_factory=list)
    """(end time, rows, real tokens, padded tokens) per optimizer step (benchmarks skip the warm-up steps)."""
    history: list = field(default_factory=list)
    """Per-epoch evaluation rows."""
    best: dict | None = None
    log_history: list = field(default_factory=list)
    """Per optimizer step, :func:`train.tracking.step_row`: loss (rank 0's rows), learning rate, gradient norm, rows/s
    (what ``curves.png`` draws and the trackers get)."""


@dataclass
class FoldResult:
    """A trained fold: what ``fold_K/metrics.json`` holds, then its held-out rows and their probabilities."""

    fold: int
    history: list
    best: dict | None
    steps: int
    samples: int
    real_tokens: int
    padded_tokens: int
    train_seconds: float
    val_index: np.ndarray | None = None
    probs: np.ndarray | None = None
    """The kept adapter's (``train.keep``) probabilities of ``val_index`` (rank 0 only)."""
    step_log: list = field(default_factory=list)
    """(end time, rows, real tokens, padded tokens) per optimizer step of this call (not in ``metrics.json``)."""
    log_history: list = field(default_factory=list)
    """Per optimizer step: loss, learning rate, gradient norm, rows/s (:attr:`FoldProgress.log_history`)."""

    METRICS = ("fold", "history", "best", "steps", "samples", "real_tokens", "padded_tokens", "train_seconds",
               "log_history")

    def metrics(self) -> dict:
        """The contents of ``metrics.json``."""
        return {k: getattr(self, k) for k in self.METRICS}

    @classmethod
    def load(cls, folder: Path, val_index: np.ndarray, keep: str) -> FoldResult:
        """A fold finished earlier: its ``metrics.json`` and the kept adapter's validation probabilities."""
        saved = json.loads((folder / "metrics.json").read_text())
        return cls(**{k: saved[k] for k in cls.METRICS if k in saved}, val_index=val_index,  # older: no log_history
                   probs=np.load(folder / f"val_probs_{keep}.npy"))


@dataclass
class Run:
    """What every model of a run shares."""

    cfg: RunConfig
    env: DistEnv
    decode: ThresholdSpec | None = None
    """The run's cascade; None: the config's steps with an argmax fallback (callers without label names)."""
    fingerprint: str = ""
    """What every checkpoint of the run agrees on (:func:`train.run_dir.run_fingerprint`)."""
    callbacks: Callbacks = field(default_factory=Callbacks)
    push: Callable[[], object] | None = None
    """Rank 0, after each checkpoint: send the run folder to the Hub."""
    model_path: str = ""
    label_names: list[str] = field(default_factory=list)
    descriptions: dict = field(default_factory=dict)
    adapter_info: dict = field(default_factory=dict)
    """Written into every adapter's ``adapter_info.json`` (distillation's provenance)."""
    dtype: str = "auto"
    """The compute dtype, resolved when the run started (:func:`train.run_dir.launch_info`)."""


# --------------------------------------------------------------------------------------------------------- the run


def main(cfg: RunConfig, resume: bool = False, callbacks: Callbacks | None = None) -> dict:
    """Train every configured fold; returns the run summary (also written to ``output_dir/summary.json``).

    An input error found after the output folder was created (e.g. ``lora.target_modules`` not in the model)
    removes the folder again if this call created it and no fold finished, so that fixing the input and running
    the same command again works without ``--resume``.
    """
    run_dir = Path(cfg.output_dir)
    existed = run_dir.exists()
    try:
        return train_cv(cfg, resume, callbacks or Callbacks())
    except (ConfigError, InputError):
        if not existed and run_dir.is_dir() and not any(run_dir.glob("fold_*/metrics.json")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def train_cv(cfg: RunConfig, resume: bool, callbacks: Callbacks) -> dict:
    """The recipe (see the module doc); :func:`main` wraps it."""
    t_start = time.time()
    env = setup_dist(cfg.train.parallel)
    run_dir = Path(cfg.output_dir)
    # 1. Validate every input before anything is written.
    tracking.check(cfg.train.report_to)
    ds = read_csv(cfg.data.train_csv, cfg.data)
    label_names = ds.label_names
    if cfg.model.num_labels is not None and cfg.model.num_labels != len(label_names):
        raise ConfigError(f"model.num_labels={cfg.model.num_labels} but {ds.path} has {len(label_names)} label "
                          f"columns ({label_names[0]} .. {label_names[-1]})")
    try:
        decode = ThresholdSpec.from_decode(label_names, cfg.decode)
    except ValueError as e:
        raise ConfigError(f"decode.fallback: {e}") from None
    descriptions = read_label_descriptions(cfg.data.label_names_csv, label_names)
    train_labels = read_training_labels(cfg.data, ds)  # data.train_labels_csv; the folds stay data.train_csv's
    check_run_dir(run_dir, resume, label_names)
    allowed = check_resume(run_dir, cfg, env.world_size) if resume else []
    launch = launch_info(cfg, env, run_dir, resume)
    env.barrier()  # DDP: every rank checks output_dir before rank 0 creates it
    model_path = resolve_model_path(cfg.model, log=logger.info if env.is_main else (lambda m: None))
    tokenizer = load_tokenizer(model_path)
    token_ids = tokenize(ds.texts, tokenizer, cfg.data.max_length)
    fold_of_row = make_folds(ds.labels, cfg.cv.n_folds, cfg.split_seed)
    folds = cfg.cv.folds if cfg.cv.folds is not None else list(range(cfg.cv.n_folds))
    # Distillation: the teachers (folds, labels, fold models) and the unlabelled rows are checked here too.
    soft = Distillation.read(cfg, ds, fold_of_row, folds) if cfg.distill.teachers else None
    if env.is_main:
        log_start(cfg, ds, token_ids, folds, env)
        if train_labels is not None:
            logger.info(train_labels.log_line(ds.path))

    # 2. The run folder: config, labels and fold assignment first, so that a resumed run can check them.
    if env.is_main:
        write_run_files(run_dir, cfg, ds, fold_of_row, descriptions, allowed, launch)
    env.barrier()
    push = None
    if cfg.hub.push_checkpoints_to and env.is_main:  # Kaggle's 12-hour limit: the next session resumes from the Hub
        from core.hub import push_checkpoint

        push = BackgroundPush(lambda: push_checkpoint(run_dir, cfg.hub.push_checkpoints_to, private=cfg.hub.private))
    run = Run(cfg, env, decode, run_fingerprint(cfg), callbacks, push, model_path, label_names, descriptions,
              dtype=launch["dtype"])

    # 3. The rows: the labelled ones, then (distillation) the unlabelled ones in no fold (-1), and the soft targets.
    rows = Rows(token_ids, ds.labels, fold_of_row)
    targets: dict[int, SoftTargets] = {}
    if soft is not None:
        pending = [k for k in folds if not (run_dir / f"fold_{k}" / "metrics.json").is_file()]
        targets = soft.fold_targets(run_dir, pending, env)
        if soft.n_unlabelled:
            rows = Rows(token_ids + tokenize(soft.unlabelled.texts, tokenizer, cfg.data.max_length),
                        soft.labels_all, soft.folds_all)
        run.adapter_info = {"distill": soft.provenance(folds, run_dir if env.is_main else None)}
    if train_labels is not None:  # train on its rows and labels; the held-out rows are scored on data.train_csv's
        rows = rows.train_on(train_labels)

    # 4. Fold by fold; a fold with metrics.json finished earlier and is read back.
    results = []
    for k in folds:
        folder = run_dir / f"fold_{k}"
        if (folder / "metrics.json").is_file():
            results.append(FoldResult.load(folder, np.flatnonzero(fold_of_row == k), cfg.train.keep))
            logger.info(f"fold {k}: already done, skipped")
            continue
        results.append(train_fold(run, rows, Fold.cv(k, rows, folder, targets.get(k))))

    # 5. The final model (cv.final): every row, the folds' settings; distilling, the teachers' fold models averaged.
    summary_extra = dict(run.adapter_info)
    if train_labels is not None:
        summary_extra["train_labels"] = train_labels.describe()
    if cfg.cv.final:
        summary_extra["final"] = train_final(run, rows, soft, run_dir)

    # 6. Out-of-fold probabilities and the summary.
    if push is not None:
        push.close()
    summary = {}
    if env.is_main:
        summary = write_summary(cfg, run_dir, ds, label_names, results, time.time() - t_start, decode, summary_extra,
                                rows)
        if cfg.cv.final:
            summary = tune_final(cfg, run_dir, summary)
        curves.write_run_curves(run_dir)
    env.barrier()
    if env.world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


def log_start(cfg: RunConfig, ds: Dataset, token_ids: list[list[int]], folds: list[int], env: DistEnv) -> None:
    lengths = np.array([len(t) for t in token_ids])
    if cfg.data.label_columns is None and cfg.data.label_prefix is None:
        logger.info(f"label columns detected (only 0/1 values; set data.label_columns to choose): {ds.label_names}")
    logger.info(f"data: {len(ds.ids)} rows x {len(ds.label_names)} labels from {ds.path}; tokens median "
                f"{int(np.median(lengths))}, max {lengths.max()} (max_length {cfg.data.max_length}); "
                f"folds {folds} of {cfg.cv.n_folds}; world size {env.world_size} on {env.device}")
    logger.info(cfg.to_yaml())


def train_final(run: Run, rows: Rows, soft: Distillation | None, run_dir: Path) -> dict:
    """The final model (``cv.final``) into ``run_dir/final``: every row of ``rows`` (distilling: the unlabelled ones
    too, the teachers' fold models averaged as targets), the folds' settings and epochs, nothing held out
    (``train.keep=last``). A fold trains on (k-1)/k of the labelled rows; this model on all of them, so it takes
    1/(k-1) more steps per epoch. Its checkpoints resume like a fold's. It is not part of the out-of-fold estimate;
    returns what the summary records about it."""
    folder = run_dir / FINAL_DIR
    name = "final model" if soft is None else "final student"
    if (folder / "metrics.json").is_file():
        logger.info(f"{name}: already done, skipped")
    else:
        every_row = np.flatnonzero(rows.trained)
        targets = soft.final_targets(run_dir, run.env) if soft is not None else None
        # Seeded after the folds (index n_folds): its own head init, dropout and checkpoint fingerprint.
        final = Fold(run.cfg.cv.n_folds, name, folder, every_row, every_row[:0], targets,
                     {"final": True, "rows": len(every_row)})
        train_fold(run, rows, final)
    out = {"adapter": str(run_dir / FINAL_ADAPTER), "epochs": run.cfg.train.num_epochs,
           "rows_labelled": int(rows.trained.sum()) - (0 if soft is None else soft.n_unlabelled)}
    if soft is not None:
        out.update(rows_unlabelled=soft.n_unlabelled,
                   targets="each teacher's fold models averaged (teachers/t{j}_final.csv)")
    return out


def tune_final(cfg: RunConfig, run_dir: Path, summary: dict) -> dict:
    """The final model's ``thresholds.json`` (:data:`core.decoding.THRESHOLDS_FILE`, which ``serve`` and ``submit``
    decode its probabilities with), tuned on the out-of-fold probabilities just written: the final model never
    scored a row it did not train on, the fold models did. Rewritten on every (resumed) run, as ``oof.csv`` is."""
    from train.merge import tune_thresholds

    adapter = Path(summary["final"]["adapter"])
    oof_rows = f"folds {summary['folds']} of {run_dir}" + ("" if len(summary["folds"]) == cfg.cv.n_folds else
                                                            f" (of {cfg.cv.n_folds}: not every row)")
    doc = tune_thresholds(run_dir / "oof.csv", cfg.data.train_csv, run_dir / "folds.csv", cfg.decode.strategy, True,
                          {"for": str(adapter), "tuned_on": f"out-of-fold probabilities of {oof_rows}: each row "
                           "predicted by the fold model that did not train on it, never by the final model"})
    write_json(adapter / THRESHOLDS_FILE, doc)
    summary["final"]["thresholds"] = str(adapter / THRESHOLDS_FILE)
    write_json(run_dir / "summary.json", summary)
    return summary


# -------------------------------------------------------------------------------------------------------- one model


def train_fold(run: Run, rows: Rows, fold: Fold) -> FoldResult:
    """Build the fold's model (4-bit base + LoRA + score head, seeded per fold), train it (:func:`fit`) and write its
    ``metrics.json`` (the mark of a finished fold)."""
    cfg, env = run.cfg, run.env
    fold.folder.mkdir(parents=True, exist_ok=True)
    device_map, max_memory = device_map_for(cfg, env)
    margs = dataclasses.replace(cfg.model, dtype=run.dtype)  # auto resolved once, when the run started
    model, tok, dtype = load_classifier(run.model_path, len(run.label_names), margs, cfg.quantization, env.device,
                                        device_map=device_map, seed=cfg.train.seed + fold.index, max_memory=max_memory)
    model = apply_lora(model, cfg.lora, cfg.train.grad_checkpointing)
    if cfg.model.head_init == "descriptions":  # every rank the same rows; fit() broadcasts rank 0's (train.head_init)
        init_score_head(model, tok, run.label_names, run.descriptions, cfg.data, dtype, cfg.train.eval_batch_size)
    params = count_parameters(model)
    if env.is_main:
        logger.info(f"{fold.name}: {params['trainable']:,} trainable of {params['total']:,} parameters, "
                    f"dtype {str(dtype).removeprefix('torch.')}")

    def save(m, folder: Path, info: dict) -> None:
        save_adapter(m, tok, folder, cfg, run.label_names, run.descriptions,
                     {**run.adapter_info, **info, "parameters": params})

    result = fit(run, rows, fold, model, tok, dtype, save)
    if env.is_main:
        write_json(fold.folder / "metrics.json", result.metrics())
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def fit(run: Run, rows: Rows, fold: Fold, model, tokenizer, dtype: torch.dtype,
        save: Callable[[object, Path, dict], None]) -> FoldResult:
    """Train ``model`` on the fold's rows (resuming from ``fold.folder/checkpoint`` if there is one): the step loop.

    ``save(model, folder, info)`` writes an adapter folder (see :func:`core.adapter.save_adapter`). Each epoch ends
    with the held-out rows scored with the run's decoding (with ``decode.strategy: sets``, set decoding too, priors
    from this fold's labelled training rows: :func:`train.evaluation.fold_decoding`), the ``last`` adapter and, when
    the selection metric improved, the ``best`` one; a final model (nothing held out) saves ``last`` only.
    """
    cfg, env, t = run.cfg, run.env, run.cfg.train
    device = input_device(model)
    train_idx, val_idx = fold.train_idx, fold.val_idx
    labelled_train = train_idx if fold.targets is None else train_idx[fold.targets.labelled[train_idx]]
    decode = run.decode
    if decode is None:
        d = cfg.decode
        decode = ThresholdSpec(tuple(map(str, range(rows.labels.shape[1]))), d.start, d.stop, d.step, "argmax")
    decode = fold_decoding(cfg, decode, rows.labels, labelled_train)  # set priors: the fold's labelled training rows
    key = selection_key(cfg)
    lengths = np.array([len(x) for x in rows.token_ids])
    pos_weight = pos_weight_from_labels(rows.labels[labelled_train], cfg.loss.pos_weight, cfg.loss.pos_weight_max)
    if fold.targets is not None and not np.isfinite(fold.targets.soft[train_idx]).all():
        raise TrainingError(f"{fold.name}: training rows without teacher targets")

    n_batches = math.ceil(len(train_idx) / t.micro_batch_size) // env.world_size
    if n_batches < 1:
        raise TrainingError(f"{fold.name}: {len(train_idx)} training rows are fewer than one micro-batch per rank")
    steps_per_epoch = math.ceil(n_batches / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.num_epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    # Optimizer and schedule, restored from the fold's checkpoint if there is one.
    opt = Optimization(model, cfg, device, dtype, total_steps)
    fingerprint = checkpoint.fingerprint(run.fingerprint, fold.index, env.world_size)
    ckpt = fold.folder / "checkpoint"
    resumed = checkpoint.exists(ckpt)
    if resumed:
        state = opt.load(ckpt, fingerprint, FoldProgress)
        logger.info(f"{fold.name}: resumed at epoch {state.epoch} step {state.step}/{total_steps}")
    else:
        state = FoldProgress()
        broadcast_trainable(opt.params, env.world_size)  # ranks agree because rank 0 says so, not by equal seeds
    tracker = tracking.Tracker.start(cfg, fold.folder.parent, fold.folder.name, state.step, enabled=env.is_main)

    def save_checkpoint() -> None:
        """Rank 0 writes the checkpoint (and pushes it); every rank waits for it, then the test hooks run."""
        if env.is_main:
            opt.save(ckpt, state, fingerprint)
            tracker.flush()
            if run.push is not None:
                run.push()
        env.barrier()
        for cb in run.callbacks.on_checkpoint:
            cb(state, resumed)

    model.train()
    done = state.step >= total_steps
    for epoch in range(state.epoch, t.num_epochs):
        if done:
            break
        # The epoch's order: length-grouped micro-batches, dealt to the ranks; a resumed run skips the steps done.
        batches = batch_order(lengths[train_idx], t.micro_batch_size, seed=t.seed * 1000 + epoch,
                              group_by_length=t.group_by_length)
        batches = [train_idx[b] for b in batches][:n_batches * env.world_size]
        steps, step_rows = rank_steps(batches, t.grad_accum_steps, env.rank, env.world_size)
        first = state.batch // t.grad_accum_steps
        bar = tqdm(total=min(len(steps), first + total_steps - state.step), initial=first,
                   desc=f"{fold.name} epoch {epoch + 1}/{t.num_epochs}", disable=not env.is_main, file=sys.stderr,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        for g in range(first, len(steps)):
            t_step = time.perf_counter()
            torch.manual_seed(step_seed(t.seed, fold.index, state.step, env.rank))  # dropout, the same after a resume
            rows_in_step = sum(len(b) for b in steps[g])
            loss_sum, real_before, padded_before = 0.0, state.real_tokens, state.padded_tokens
            # Forward + backward of the step's micro-batches, each cut into token-budget pieces.
            for piece in [p for b in steps[g] for p in split_by_tokens(b, lengths, t.max_tokens_per_micro_batch)]:
                batch = collate([rows.token_ids[i] for i in piece], tokenizer.pad_token_id, rows.labels[piece])
                with autocast(device, dtype):
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits
                if fold.targets is None:
                    loss = multilabel_loss(logits, batch["labels"].to(logits.device), cfg.loss, pos_weight)
                else:
                    loss = distill_loss(logits, batch["labels"], torch.as_tensor(fold.targets.soft[piece]),
                                        torch.as_tensor(fold.targets.labelled[piece]), fold.targets.alpha, cfg.loss,
                                        pos_weight)
                # Weight each piece by its rows so a short one counts as much as its rows; the all-reduce averages
                # over ranks, so the gradient is the mean over the step's rows on all ranks.
                opt.backward(loss * (len(piece) * env.world_size / step_rows[g]))
                loss_sum += loss.item() * len(piece)
                state.real_tokens += int(batch["attention_mask"].sum())
                state.padded_tokens += batch["attention_mask"].numel()
            state.samples += step_rows[g]  # rows of all ranks
            state.step_log.append((time.perf_counter(), rows_in_step, state.real_tokens - real_before,
                                   state.padded_tokens - padded_before))
            mean_loss = loss_sum / rows_in_step
            # Optimizer step: gradients averaged over the ranks; unscale, clip, step, LR schedule, zero the gradients.
            if env.world_size > 1:
                allreduce_grads(opt.params, env.world_size)
            grad_norm = opt.step()
            state.step += 1
            state.batch = (g + 1) * t.grad_accum_steps
            state.log_history.append(tracking.step_row(state.step, mean_loss, opt.lr, grad_norm, step_rows[g],
                                                       time.perf_counter() - t_step))
            tracker.log_step(state.log_history[-1])
            for cb in run.callbacks.on_step:
                cb(state, mean_loss)
            check_finite(mean_loss, state.step, t.nan_guard_steps, dtype, fold.name, env.world_size)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{opt.lr:.2e}", gnorm=f"{grad_norm:.2f}")
            if state.step >= total_steps:
                done = True
                break
            if t.save_every_steps and state.step % t.save_every_steps == 0:
                state.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint()
        bar.close()
        state.train_seconds += time.perf_counter() - t0

        # End of the epoch (or of max_steps): evaluate on the held-out rows, save the last / best adapters.
        if env.is_main and not len(val_idx):  # the final model: nothing held out
            state.history.append({"epoch": epoch + 1, "step": state.step})
            save(model, fold.folder / "last", {**fold.adapter_info, "epoch": epoch + 1})
        elif env.is_main:
            probs = predict_probs(model, [rows.token_ids[i] for i in val_idx], tokenizer.pad_token_id,
                                  t.eval_batch_size, dtype, desc=f"{fold.name} eval")
            model.train()
            metrics = evaluate(probs, rows.scored_labels[val_idx], decode)
            row = {"epoch": epoch + 1, "step": state.step, **metrics}
            state.history.append(row)
            tracker.log_eval(state.step, metrics)
            sets_em = f", {metrics['sets/exact_match']:.4f} sets" if "sets/exact_match" in metrics else ""
            logger.info(f"{fold.name} epoch {epoch + 1}: exact-match {metrics['t0.5/exact_match']:.4f} @0.5, "
                        f"{metrics['cascade/exact_match']:.4f} cascade{sets_em}; micro-F1 "
                        f"{metrics['cascade/micro_f1']:.4f} cascade")
            info = {**fold.adapter_info, "epoch": epoch + 1, "metrics": metrics}
            save(model, fold.folder / "last", info)
            save_npy(fold.folder / "val_probs_last.npy", probs)
            if state.best is None or metrics[key] > state.best.get(key, -np.inf):
                state.best = row
                save(model, fold.folder / "best", info)
                save_npy(fold.folder / "val_probs_best.npy", probs)
        env.barrier()
        state.epoch, state.batch = epoch + 1, 0
        save_checkpoint()
    tracker.close()

    probs = np.load(fold.folder / f"val_probs_{t.keep}.npy") if env.is_main and len(val_idx) else None
    return FoldResult(fold.index, state.history, state.best, state.step, state.samples, state.real_tokens,
                      state.padded_tokens, state.train_seconds, val_index=val_idx, probs=probs,
                      step_log=state.step_log, log_history=state.log_history)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
