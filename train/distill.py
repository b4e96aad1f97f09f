"""Knowledge distillation from cross-validated teacher runs into a (smaller) student, with honest cross-validation:
the soft-target source (:class:`Distillation`) that the classification recipe (:mod:`train.run`) and the TF-IDF
baseline (:mod:`train.tfidf_run`) train on.

Usage:
    python -m train distill --config STUDENT.yaml --teacher RUN[,RUN2...] [--teacher-weights 2,1] \\
        [--unlabelled unlabelled.csv] [--set distill.alpha=0.3 --set distill.temperature=2] [--resume]

The student is an ordinary ``python -m train`` run (same folds, resume, ``oof.csv``, ``summary.json``, adapter
folders) whose loss mixes the hard labels with the teachers' soft targets (:func:`train.loss.distill_loss`:
``alpha`` x hard + ``(1 - alpha)`` x BCE against ``sigmoid(logit(p) / temperature)`` of the weighted teachers); the
rows of ``--unlabelled`` join the training rows of every fold (never a validation fold) with the soft term only.

The no-leak rule: the student of fold k learns only from teacher models that never saw fold k's labels. Every
teacher must be on the student's folds (its ``folds.csv`` equal to the student's: same ids, same fold of each row;
refused otherwise), and for fold k only the teacher's **fold-k model** scores the student's training rows (every
labelled row outside fold k) and the unlabelled rows. Fold k's own rows get no target at all (they only validate).

* ``python -m train`` runs: the ``fold_K/<train.keep>`` adapter is run on those rows (the run must have finished
  every fold the student trains);
* ``python -m train tfidf`` runs: their ``oof.csv`` only holds fold-k predictions *for fold k's rows*, which the
  student may not train on, so the fold-k TF-IDF model is refit here (the same features, ``C`` and seed on the
  labelled rows outside fold k) and scores the training rows. (Deterministic: it is the run's fold-k model.)

The teachers' probabilities are written to ``RUN/teachers/t{j}_fold_{k}.csv`` (+ ``.meta.json``) before the first
fold trains and read back from there, so a resumed run uses exactly the same targets; ``RUN/teachers/teachers.json``
and every adapter's ``adapter_info.json`` (key ``distill``) name the teachers.

``--final`` (``cv.final``, the final model of any run: :func:`train.run.train_final`) also trains the submission
student ``RUN/final/last`` after the folds: every labelled and unlabelled row, its targets each teacher's fold models
averaged over all folds (``RUN/teachers/t{j}_final.csv``; every teacher fold must be finished), the folds' epochs,
no validation (``train.keep=last``). It is not part of ``oof.csv``; its adapter is what ``python -m infer predict
--adapter RUN/final/last`` submits with (the CV estimate is the folds'; its ``thresholds.json`` is tuned on them).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.adapter import LABELS_FILE, finished_folds
from core.config import RunConfig
from core.data import Dataset, read_csv
from core.errors import ConfigError, InputError
from core.io import meta_path, read_probs, write_json, write_probs
from train import tfidf

logger = logging.getLogger(__name__)

TEACHER_DIR = "teachers"
EPS = 1e-6


@dataclass
class SoftTargets:
    """Distillation targets of one model (a fold, or the final model): per-row teacher probabilities and which rows
    have labels, over the rows it trains on (the labelled rows, then the unlabelled ones)."""

    soft: np.ndarray
    """rows x classes teacher probabilities; NaN on rows that are not trained on (the validation fold)."""
    labelled: np.ndarray
    """rows booleans: False for the unlabelled rows (soft term only)."""
    alpha: float
    """Weight of the hard-label term (see :func:`train.loss.distill_loss`)."""


@dataclass
class Teacher:
    """One validated teacher run."""

    index: int
    path: Path
    kind: str
    """``run`` (a ``python -m train`` run: fold adapters) or ``tfidf`` (refit per fold)."""
    cfg: RunConfig
    weight: float
    c: float = 4.0
    """TF-IDF: the regression's C."""

    def describe(self, folds: list[int]) -> dict:
        out = {"teacher": str(self.path), "kind": self.kind, "weight": self.weight, "folds": folds}
        if self.kind == "run":
            out["fold_models"] = {str(k): str(self.path / f"fold_{k}" / self.cfg.train.keep) for k in folds}
        else:
            out["fold_models"] = f"tfidf refit on the labelled rows outside each fold (C={self.c})"
        return out


def _id_strings(ids) -> np.ndarray:
    return np.asarray([str(v) for v in ids])


def check_same_folds(path: Path, ids: np.ndarray, fold_of_row: np.ndarray, student: str) -> None:
    """Refuse a teacher whose ``folds.csv`` differs from the student's split (rows, order or fold of a row)."""
    folds_csv = path / "folds.csv"
    if not folds_csv.is_file():
        raise InputError(f"{folds_csv}: teacher run without folds.csv (a teacher must be a cross-validated run)")
    df = pd.read_csv(folds_csv)
    if list(df.columns[:2]) != ["index", "fold"]:
        raise InputError(f"{folds_csv}: expected columns index, fold; got {list(df.columns)}")
    t_ids, t_folds = _id_strings(df["index"]), df["fold"].to_numpy()
    s_ids = _id_strings(ids)
    if len(t_ids) != len(s_ids):
        raise InputError(f"{folds_csv}: the teacher was trained on {len(t_ids)} rows, the student's data "
                         f"{student} has {len(s_ids)}: a teacher must be on the student's data and folds")
    bad = np.flatnonzero((t_ids != s_ids) | (t_folds != fold_of_row))
    if len(bad):
        r = int(bad[0])
        raise InputError(f"{folds_csv}: the teacher's folds differ from the student's ({len(bad)} rows; row {r + 2}: "
                         f"teacher id {t_ids[r]} in fold {t_folds[r]}, student id {s_ids[r]} in fold "
                         f"{fold_of_row[r]}); train the teacher on the same data with the same cv.n_folds and "
                         f"split seed (cv.seed, else train.seed)")


def read_teachers(cfg: RunConfig, ds: Dataset, fold_of_row: np.ndarray, folds: list[int]) -> list[Teacher]:
    """Validate every teacher of ``cfg.distill``: a known kind of run, the student's labels and folds, a finished
    fold model for each of ``folds``.

    Raises:
        InputError: naming the teacher folder and what is wrong with it.
    """
    d = cfg.distill
    weights = d.teacher_weights or [1.0] * len(d.teachers)
    out = []
    for j, (spec, w) in enumerate(zip(d.teachers, weights)):
        path = Path(spec)
        if not path.is_dir():
            raise InputError(f"distill teacher {spec}: run folder not found")
        if path.resolve() == Path(cfg.output_dir).resolve():
            raise InputError(f"distill teacher {spec} is the student's own output_dir")
        summary = path / "summary.json"
        info = json.loads(summary.read_text()) if summary.is_file() else {}
        if (path / "run_config.yaml").is_file():
            try:
                tcfg = RunConfig.from_yaml(path / "run_config.yaml")
            except ConfigError as e:
                raise InputError(f"distill teacher {spec}: {e}") from None
            labels_file = path / LABELS_FILE
            names = json.loads(labels_file.read_text())["label_names"] if labels_file.is_file() else None
            teacher = Teacher(j, path, "run", tcfg, float(w))
            done = {k for k, _ in finished_folds(path, tcfg.train.keep)}
            need = sorted(set(folds) | (set(range(cfg.cv.n_folds)) if cfg.cv.final else set()))
            missing = [k for k in need if k not in done]
            if missing:
                raise InputError(f"distill teacher {spec}: fold(s) {missing} have no finished "
                                 f"{tcfg.train.keep!r} adapter (fold_K/metrics.json and fold_K/{tcfg.train.keep}/); "
                                 f"the student's fold k needs the teacher's fold-k model"
                                 + (" (cv.final needs every fold)" if cfg.cv.final else ""))
        elif info.get("produced_by") == "python -m train tfidf":
            try:
                tcfg = RunConfig.from_dict(info["config"], source=str(summary))
            except (ConfigError, KeyError) as e:
                raise InputError(f"{summary}: cannot read the tfidf run's config: {e}") from None
            names = json.loads((path / "oof.csv.meta.json").read_text())["label_names"] \
                if (path / "oof.csv.meta.json").is_file() else None
            teacher = Teacher(j, path, "tfidf", tcfg, float(w), c=float(info.get("C", 4.0)))
        else:
            raise InputError(f"distill teacher {spec}: not a teacher run (expected a python -m train run folder "
                             f"with run_config.yaml and fold_K/ adapters, or a python -m train tfidf folder)")
        if names is not None and list(names) != list(ds.label_names):
            raise InputError(f"distill teacher {spec}: trained on labels {names[:3]}... ({len(names)}), the "
                             f"student's data has {ds.label_names[:3]}... ({len(ds.label_names)})")
        check_same_folds(path, ds.ids, fold_of_row, ds.path)
        out.append(teacher)
    return out


def read_unlabelled(cfg: RunConfig, ds: Dataset) -> Dataset | None:
    """The student's ``distill.unlabelled_csv`` rows (ids disjoint from the labelled rows), or None."""
    path = cfg.distill.unlabelled_csv
    if not path:
        return None
    unl = read_csv(path, cfg.data, labelled=False, label_names=ds.label_names)
    both = set(_id_strings(unl.ids)) & set(_id_strings(ds.ids))
    if both:
        raise InputError(f"{path} (distill.unlabelled_csv): {len(both)} id(s) are also labelled rows of {ds.path} "
                         f"(e.g. {min(both)}); an unlabelled row must not be a labelled one")
    return unl


def teacher_texts(teacher: Teacher, cfg: RunConfig, ds: Dataset, unl: Dataset | None) -> list[str]:
    """The labelled then unlabelled rows as the teacher's prompt (its ``data.text_template``)."""
    if (teacher.cfg.data.text_template, teacher.cfg.data.id_column) == (cfg.data.text_template, cfg.data.id_column):
        return list(ds.texts) + (list(unl.texts) if unl is not None else [])
    t = read_csv(cfg.data.train_csv, teacher.cfg.data, labelled=False)
    if not np.array_equal(_id_strings(t.ids), _id_strings(ds.ids)):
        raise InputError(f"distill teacher {teacher.path}: its id column {teacher.cfg.data.id_column!r} gives other "
                         f"ids than the student's {cfg.data.id_column!r} in {ds.path}")
    texts = list(t.texts)
    if unl is not None:
        texts += list(read_csv(unl.path, teacher.cfg.data, labelled=False).texts)
    return texts


def predict_fold(teacher: Teacher, fold: int, texts: list[str], device) -> np.ndarray:
    """Probabilities of the teacher run's fold-``fold`` adapter for ``texts`` (rows x classes) on ``device``."""
    import gc

    import torch
    from peft import PeftModel

    from core.adapter import read_adapter
    from core.data import tokenize
    from core.model import load_classifier, load_tokenizer, predict_probs, resolve_model_path

    ref = read_adapter(teacher.path / f"fold_{fold}" / teacher.cfg.train.keep)
    base = resolve_model_path(ref.cfg.model, log=lambda m: None)
    model, base_tok, dtype = load_classifier(base, len(ref.label_names), ref.cfg.model, ref.cfg.quantization,
                                             torch.device(device))
    tok = load_tokenizer(str(ref.folder)) if (ref.folder / "tokenizer_config.json").is_file() else base_tok
    model = PeftModel.from_pretrained(model, str(ref.folder), is_trainable=False)
    token_ids = tokenize(texts, tok, ref.cfg.data.max_length)
    probs = predict_probs(model, token_ids, tok.pad_token_id, ref.cfg.train.eval_batch_size, dtype,
                          desc=f"teacher {teacher.index} fold {fold}")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return probs


def teacher_fold_probs(teacher: Teacher, fold: int, texts: list[str], labels: np.ndarray, fold_of_row: np.ndarray,
                       rows: np.ndarray, device, final: bool = False) -> np.ndarray:
    """The teacher's fold-``fold`` model's probabilities for ``rows`` (indices into labelled + unlabelled rows;
    ``fold_of_row``: -1 for unlabelled rows). Never a model that saw fold ``fold``'s labels. A student fold never
    trains on fold ``fold``'s rows, so asking for them is an error unless ``final`` (the all-rows student)."""
    if fold in fold_of_row[rows] and not final:
        raise ValueError(f"fold {fold}: its own rows get no teacher targets")
    if teacher.kind == "tfidf":
        texts_arr = np.asarray(texts, dtype=object)
        fit_rows = np.flatnonzero((fold_of_row != fold) & (fold_of_row >= 0))
        return tfidf.fit_predict(texts_arr[fit_rows], labels[fit_rows], texts_arr[rows], teacher.c,
                                 teacher.cfg.train.seed)
    return predict_fold(teacher, fold, [texts[i] for i in rows], device)


def combine(probs: list[np.ndarray], weights: list[float], temperature: float) -> np.ndarray:
    """Soft targets: the weighted mean over teachers of ``sigmoid(logit(p) / temperature)``."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = 0.0
    for p, wi in zip(probs, w):
        p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
        out = out + wi / (1 + np.exp(-np.log(p / (1 - p)) / temperature))
    return np.asarray(out)


def check_cached(path: Path, teacher: Teacher) -> None:
    """Refuse a cached target file (e.g. copied from another run's ``teachers/``) that another teacher wrote."""
    mp = meta_path(path)
    meta = json.loads(mp.read_text()) if mp.is_file() else {}
    got = meta.get("teacher")
    if got is None or Path(got).resolve() != teacher.path.resolve() or meta.get("kind") != teacher.kind:
        raise InputError(f"{path}: cached targets of teacher {got!r} ({meta.get('kind')}), but teacher "
                         f"{teacher.index} is {teacher.path} ({teacher.kind}); remove the file to recompute it")


@dataclass
class Distillation:
    """The soft-target source of a distilled run: its validated teachers and unlabelled rows, over the rows the
    student trains on (the labelled rows, then the unlabelled ones, in no fold).

    The classification recipe (:mod:`train.run`) trains fold k on :meth:`fold_targets` and the final model on
    :meth:`final_targets`; the TF-IDF student (:mod:`train.tfidf_run`) fits on the same targets. The teachers'
    probabilities are written to ``run_dir/teachers/`` and read back from there, so that a resumed run uses the
    targets the first run wrote.
    """

    cfg: RunConfig
    ds: Dataset
    fold_of_row: np.ndarray
    """The fold of each labelled row (the student's split)."""
    teachers: list[Teacher]
    unlabelled: Dataset | None

    @classmethod
    def read(cls, cfg: RunConfig, ds: Dataset, fold_of_row: np.ndarray, folds: list[int]) -> Distillation:
        """Validate ``cfg.distill``'s teachers for ``folds`` (:func:`read_teachers`) and read its unlabelled rows,
        before anything is written."""
        return cls(cfg, ds, fold_of_row, read_teachers(cfg, ds, fold_of_row, folds), read_unlabelled(cfg, ds))

    @property
    def n_unlabelled(self) -> int:
        return 0 if self.unlabelled is None else len(self.unlabelled.ids)

    @property
    def ids(self) -> np.ndarray:
        """The ids of the labelled, then the unlabelled rows."""
        return np.concatenate([self.ds.ids, self.unlabelled.ids]) if self.unlabelled is not None else self.ds.ids

    @property
    def folds_all(self) -> np.ndarray:
        """The fold of each labelled row, then -1 for each unlabelled row."""
        return np.concatenate([self.fold_of_row, np.full(self.n_unlabelled, -1)])

    @property
    def labels_all(self) -> np.ndarray:
        """The labels of the labelled rows, then zeros for the unlabelled rows."""
        ds = self.ds
        return np.concatenate([ds.labels, np.zeros((self.n_unlabelled, len(ds.label_names)), ds.labels.dtype)])

    def copy_cached(self, src: str | Path, tdir: Path) -> None:
        """Copy the target files of the teachers (by position) from another run's ``teachers/`` folder
        (``--targets-from``) into ``tdir``; :meth:`fold_targets` then checks each against its teacher and rows."""
        src = Path(src)
        files = [f for t in self.teachers
                 for f in sorted(src.glob(f"t{t.index}_fold_*.csv")) + [src / f"t{t.index}_final.csv"] if f.is_file()]
        if not files:
            raise InputError(f"--targets-from {src}: no teacher target files (t<j>_fold_<k>.csv) there")
        tdir.mkdir(parents=True, exist_ok=True)
        for f in files:
            if not (tdir / f.name).exists():
                shutil.copyfile(f, tdir / f.name)
                if meta_path(f).is_file():
                    shutil.copyfile(meta_path(f), meta_path(tdir / f.name))
        logger.info(f"distill: {len(files)} cached teacher target file(s) from {src}")

    def fold_targets(self, run_dir: Path, folds: list[int], env) -> dict[int, SoftTargets]:
        """Soft targets of each of ``folds`` over the labelled + unlabelled rows, from the teachers' fold models.

        Rank 0 computes what ``run_dir/teachers/`` does not hold yet and writes it; every rank then reads the files
        (``env``: a :class:`train.dist.DistEnv`).
        """
        cfg, ds, teachers = self.cfg, self.ds, self.teachers
        ids, folds_all, labels_all = self.ids, self.folds_all, self.labels_all
        labelled = np.arange(len(ids)) < len(ds.ids)
        tdir = run_dir / TEACHER_DIR
        if env.is_main:
            texts = {}
            for fold in folds:
                rows = np.flatnonzero(folds_all != fold)
                for t in teachers:
                    path = tdir / f"t{t.index}_fold_{fold}.csv"
                    if path.is_file():
                        check_cached(path, t)
                        continue
                    if t.index not in texts:
                        texts[t.index] = teacher_texts(t, cfg, ds, self.unlabelled)
                    logger.info(f"distill: teacher {t.index} ({t.kind} {t.path}) fold-{fold} model scores "
                                f"{len(rows)} rows")
                    p = teacher_fold_probs(t, fold, texts[t.index], labels_all, folds_all, rows, env.device)
                    write_probs(path, ids[rows], p, ds.label_names,
                                meta={"kind": "distillation targets", **t.describe([fold]), "fold": fold,
                                      "rows_labelled": int(labelled[rows].sum()),
                                      "rows_unlabelled": int((~labelled[rows]).sum())})
        env.barrier()
        out = {}
        for fold in folds:
            rows = np.flatnonzero(folds_all != fold)
            probs = []
            for t in teachers:
                path = tdir / f"t{t.index}_fold_{fold}.csv"
                got_ids, p, _ = read_probs(path, ds.label_names)
                if not np.array_equal(_id_strings(got_ids), _id_strings(ids[rows])):
                    raise InputError(f"{path}: targets for other rows than fold {fold}'s training rows; the data "
                                     f"changed since this run started (start a new run with --set output_dir=...)")
                probs.append(p)
            soft = np.full((len(ids), len(ds.label_names)), np.nan, dtype=np.float32)
            soft[rows] = combine(probs, [t.weight for t in teachers], cfg.distill.temperature)
            out[fold] = SoftTargets(soft=soft, labelled=labelled, alpha=cfg.distill.alpha)
        return out

    def final_targets(self, run_dir: Path, env) -> SoftTargets:
        """Soft targets of the final student over every labelled + unlabelled row: per teacher the mean of its fold
        models' probabilities (fold k's on its own rows too: there is no held-out fold left to leak into)."""
        cfg, ds, teachers = self.cfg, self.ds, self.teachers
        ids, folds_all, labels_all = self.ids, self.folds_all, self.labels_all
        rows = np.arange(len(ids))
        tdir = run_dir / TEACHER_DIR
        if env.is_main:
            for t in teachers:
                path = tdir / f"t{t.index}_final.csv"
                if path.is_file():
                    check_cached(path, t)
                    continue
                texts = teacher_texts(t, cfg, ds, self.unlabelled)
                per_fold = []
                for fold in range(cfg.cv.n_folds):
                    logger.info(f"distill (final): teacher {t.index} fold-{fold} model scores all {len(rows)} rows")
                    per_fold.append(teacher_fold_probs(t, fold, texts, labels_all, folds_all, rows, env.device,
                                                       final=True))
                write_probs(path, ids, np.mean(per_fold, axis=0), ds.label_names,
                            meta={"kind": "distillation targets of the final student (fold models averaged)",
                                  **t.describe(list(range(cfg.cv.n_folds)))})
        env.barrier()
        probs = []
        for t in teachers:
            path = tdir / f"t{t.index}_final.csv"
            got_ids, p, _ = read_probs(path, ds.label_names)
            if not np.array_equal(_id_strings(got_ids), _id_strings(ids)):
                raise InputError(f"{path}: targets for other rows than the final student's; the data changed since "
                                 f"this run started")
            probs.append(p)
        soft = combine(probs, [t.weight for t in teachers], cfg.distill.temperature).astype(np.float32)
        return SoftTargets(soft=soft, labelled=rows < len(ds.ids), alpha=cfg.distill.alpha)

    def provenance(self, folds: list[int], run_dir: Path | None = None) -> dict:
        """What a distilled run and its adapters record about their teachers (also written to
        ``run_dir/teachers/teachers.json`` when ``run_dir`` is given)."""
        d = self.cfg.distill
        out = {"teachers": [t.describe(folds) for t in self.teachers], "alpha": d.alpha,
               "temperature": d.temperature, "unlabelled_csv": d.unlabelled_csv, "unlabelled_rows": self.n_unlabelled}
        if run_dir is not None:
            write_json(run_dir / TEACHER_DIR / "teachers.json", out)
        return out
