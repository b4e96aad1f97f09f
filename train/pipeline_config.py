"""The pipeline's config (``python -m train pipeline --config PIPELINE.yaml``): which steps run, the run config
each step uses, seeds and variants, the TF-IDF blend, tune and decoding options, the submission. Loaded like the run
config (:func:`core.config.read_yaml` + :func:`core.config.build`: unknown keys and wrong types are errors naming the
key); what the steps do with it: :mod:`train.pipeline`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from core.config import build, read_yaml
from core.errors import ConfigError

VARIANT_NAME = re.compile(r"[A-Za-z0-9_-]+")
SEED_NAME = re.compile(r"seed\d+")


@dataclass
class TrimVocabStep:
    enabled: bool = False
    """Shrink the model's vocabulary to the labelled CSV, the test CSV and DAPT's corpus (``train trim-vocab``);
    every later step uses the trimmed model ``RUN/base``."""
    corpus: list[str] = field(default_factory=list)
    """More CSVs whose text the vocabulary must cover."""


@dataclass
class DaptStep:
    enabled: bool = False
    """Domain-adaptive pretraining on unlabelled text (``train dapt``); the CV starts from its adapter."""
    config: str | None = None
    """DAPT's run config (e.g. ``configs/gemma-3-270m/dapt.yaml``); ``None``: the CV's config and overrides (its
    train section too)."""
    overrides: list[str] = field(default_factory=list)
    """``--set`` overrides of DAPT's config."""
    corpus: list[str] = field(default_factory=list)
    """Unlabelled CSVs to pretrain on; ``[]``: the test CSV."""
    eval_rows: int = 0
    """Corpus rows held out to report DAPT's loss before and after (``--eval-rows``)."""


@dataclass
class CVStep:
    seeds: list[int] = field(default_factory=list)
    """One CV per seed (``train.seed``), all on the first one's folds (``cv.seed``); each is a model of the blend.
    ``[]``: one CV with the config's seed."""
    variants: dict[str, list[str]] = field(default_factory=dict)
    """More CVs, each a model of the blend: name -> ``--set`` overrides on top of the first CV's (e.g. another prompt
    template, ``data.text_template=...``), on its folds and from its DAPT adapter, into ``RUN/cv-<name>``. Its
    prediction, final model and OOF are its own (``infer predict`` formats each row with the variant's template)."""
    final: bool = False
    """Also train the final model on every labelled row (``--final``: ``RUN/cv/final/last``)."""
    nproc_per_node: int = 1
    """Processes (GPUs) of the CV: > 1 launches it as ``torchrun --nproc_per_node N -m train`` (DDP)."""


@dataclass
class MergeStep:
    enabled: bool = False
    """Merge every fold adapter of every seed into one adapter (``train merge``: ``RUN/merged``)."""
    method: Literal["cat", "svd"] = "cat"
    """``cat``: exact sum of the LoRA deltas (rank k x r); ``svd``: rank r."""


@dataclass
class PredictStep:
    model: Literal["folds", "final", "folds+final", "merged"] = "folds"
    """What predicts the test CSV: each CV's fold models averaged, its final model (``cv.final``), both (the fold
    average and the final model weighted a half each: one ``predict --adapter RUN,RUN/final/last``) or the merged
    adapter (``merge.enabled``; it stands for every seed in the blend)."""
    batch_size: int = 64
    base_model: str | None = None
    """Local folder of the base model when it is not where the adapters recorded it (``--base-model``)."""


@dataclass
class TfidfStep:
    enabled: bool = False
    """A TF-IDF model on the CV's folds (``train tfidf``), blended with the LLM."""
    C: float = 4.0
    """Inverse L2 regularisation of its regressions (``--C``)."""


@dataclass
class BlendStep:
    """Runs when there are two models or more (TF-IDF, seeds, variants): weights tuned on the OOF files
    (``infer blend``)."""

    n_trials: int = 100
    seed: int = 0


@dataclass
class TuneStep:
    enabled: bool = True
    """Tune the decoding on the (blended) OOF (``infer tune``); the blend's nested estimate tunes it too."""
    strategy: Literal["cascade", "sets"] = "cascade"
    n_trials: int = 100
    seed: int = 0


@dataclass
class SubmitStep:
    enabled: bool = True
    """Write ``RUN/submission.csv`` for the test CSV (``infer submit``)."""


@dataclass
class PipelineConfig:
    config: str | None = None
    """The run config of the CV (and of the final fit, TF-IDF); ``None``: the toolkit's defaults, or with ``runs``
    the first run's ``run_config.yaml``."""
    overrides: list[str] = field(default_factory=list)
    """``--set`` overrides of that config (every step that reads it gets them)."""
    train_csv: str | None = None
    """The labelled CSV (``data.train_csv``); ``None``: the config's."""
    label_names_csv: str | None = None
    """The labels' names / descriptions (``data.label_names_csv``: the score head starts from them with
    ``model.head_init: descriptions``); ``None``: the config's."""
    test_csv: str | None = None
    """The CSV to predict and submit (``--test``); ``None``: no predict / submit (the blend and tune run on OOF)."""
    runs: list[str] = field(default_factory=list)
    """Finished CV run folders to start from instead of training (trim-vocab, DAPT and the CV do not run)."""
    trim_vocab: TrimVocabStep = field(default_factory=TrimVocabStep)
    dapt: DaptStep = field(default_factory=DaptStep)
    cv: CVStep = field(default_factory=CVStep)
    merge: MergeStep = field(default_factory=MergeStep)
    predict: PredictStep = field(default_factory=PredictStep)
    tfidf: TfidfStep = field(default_factory=TfidfStep)
    blend: BlendStep = field(default_factory=BlendStep)
    tune: TuneStep = field(default_factory=TuneStep)
    submit: SubmitStep = field(default_factory=SubmitStep)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
        raw, source = read_yaml(path, overrides)
        cfg = build(cls, raw, source)
        cfg.validate(source)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False, allow_unicode=True)

    def validate(self, source: str = "<pipeline config>") -> None:
        """Cross-field checks; every problem in one ConfigError."""
        problems = []
        if self.runs and (self.trim_vocab.enabled or self.dapt.enabled or self.cv.seeds or self.cv.variants
                          or self.cv.final):
            problems.append("runs (finished CV runs) leaves nothing to train: trim_vocab.enabled, dapt.enabled, "
                            "cv.seeds, cv.variants and cv.final must be off")
        if len(set(self.cv.seeds)) != len(self.cv.seeds):
            problems.append(f"cv.seeds must be distinct, got {self.cv.seeds}")
        for name, sets in self.cv.variants.items():
            if not VARIANT_NAME.fullmatch(name) or SEED_NAME.fullmatch(name):
                problems.append(f"cv.variants: name {name!r} must be letters, digits, '_' or '-' (not seed<N>: "
                                f"cv.seeds' folders): it names the folder RUN/cv-{name}")
            for item in sets:
                key = item.split("=", 1)[0].strip()
                if "=" not in item:
                    problems.append(f"cv.variants.{name}: {item!r} is not of the form key=value")
                elif key == "output_dir" or key.startswith(("cv.", "data.train_csv")):
                    problems.append(f"cv.variants.{name}: {key} may not change (a variant is a model of the "
                                    f"blend on the first CV's rows and folds, in RUN/cv-{name})")
        if self.predict.model in ("final", "folds+final") and not (self.cv.final or self.runs):
            problems.append(f"predict.model={self.predict.model} needs cv.final=true")
        if self.predict.model == "merged" and not self.merge.enabled:
            problems.append("predict.model=merged needs merge.enabled=true")
        for key, v in [("cv.nproc_per_node", self.cv.nproc_per_node), ("predict.batch_size", self.predict.batch_size),
                       ("blend.n_trials", self.blend.n_trials), ("tune.n_trials", self.tune.n_trials)]:
            if v < 1:
                problems.append(f"{key} must be >= 1, got {v}")
        if self.dapt.eval_rows < 0:
            problems.append(f"dapt.eval_rows must be >= 0, got {self.dapt.eval_rows}")
        if self.tfidf.C <= 0:
            problems.append(f"tfidf.C must be > 0, got {self.tfidf.C}")
        if self.dapt.enabled and not (self.dapt.corpus or self.test_csv):
            problems.append("dapt.enabled needs dapt.corpus or a test CSV (--test) to pretrain on")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
