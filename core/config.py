"""Typed run configuration, loaded from YAML with dotted ``key=value`` overrides.

Only stdlib + PyYAML are imported here so that every command and the CPU tests can load configs cheaply.
Unknown keys, wrong types and inconsistent values raise :class:`ConfigError`, which names the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.errors import ConfigError

DEFAULT_TEMPLATE = "{text}"
EMBEDDED_MODEL = "embedded:gemma-3-270m"


@dataclass
class ModelArgs:
    name_or_path: str = EMBEDDED_MODEL
    """A local folder, a Hub id already in the local cache, or ``embedded:gemma-3-270m`` (the registry GGUF)."""
    gguf_file: str | None = None
    """GGUF file inside ``name_or_path`` (or an absolute path); converted once to a cached HF folder."""
    num_labels: int | None = None
    """Number of classes; ``None`` takes it from the data's label columns."""
    head_init: Literal["random", "descriptions"] = "random"
    """How the ``score`` head's rows start: ``random`` (transformers' init, seeded per fold) or ``descriptions``: each
    class's row is the model's pooled hidden state of its ``data.label_names_csv`` name (its label name where it has
    none), centred over the classes and scaled so the logits start at the random head's scale (:mod:`train.head_init`)."""
    pooling: Literal["last", "mean"] = "last"
    """What the ``score`` head reads: ``last``, the final hidden state at the row's last token (transformers'
    sequence classification); ``mean``, the mean of the final hidden states over the row's tokens
    (:func:`core.model.set_pooling`). Every load of the run's model pools the same way (training, predict, serve);
    ``infer export`` refuses ``mean``: a plain transformers classifier pools the last token."""
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"
    """``auto``: eager for Gemma-2 (attention logit soft-capping), SDPA otherwise."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype. ``auto``: bf16 on GPUs that support it, else fp16 on GPU; on the CPU bf16 where it is native
    (AVX512-BF16 or AMX), else fp32. A run resolves ``auto`` when it starts and keeps that dtype when resumed."""
    cache_dir: str | None = None
    """Where converted GGUF models are cached; default ``$QLML_CACHE`` or ``~/.cache/qlora-multilabel``."""


@dataclass
class QuantizationArgs:
    load_in_4bit: bool = True
    """bitsandbytes 4-bit weights for the linear layers (QLoRA). Embeddings and norms stay in the compute dtype."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    """Quantize the quantization constants too (~0.4 bit/param saved)."""


@dataclass
class LoraArgs:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    layers_from: int | None = None
    """Apply LoRA only to decoder layers with index >= this (the reference adapts the upper layers only)."""
    layers_to_transform: list[int] | None = None
    """Explicit layer indices; overrides ``layers_from``."""
    use_dora: bool = False
    init_adapter: str | None = None
    """Start the LoRA weights from this adapter folder (``python -m train dapt``; same r, alpha, modules and
    layers required) instead of the usual init; the ``score`` head stays fresh."""


@dataclass
class DataArgs:
    train_csv: str = "data/sample_train.csv"
    """Labelled CSV: an id column, the template's text columns and one 0/1 column per class."""
    train_labels_csv: str | None = None
    """Labels to TRAIN on (e.g. ``infer audit``'s ``train_labels_dropped.csv``): its rows are matched by id to
    ``train_csv``'s; a row of ``train_csv`` absent from it is not trained on (in any fold, nor in the final model);
    its label columns (the same as ``train_csv``'s) replace ``train_csv``'s for training only. The folds, the held-out
    fold's evaluation, ``oof.csv``'s scores, ``summary.json`` and everything downstream stay ``train_csv``'s, so a run
    with and one without it are paired row for row. ``None``: train on ``train_csv``'s labels."""
    id_column: str = "id"
    """The column holding each row's id (any name; ids must be unique)."""
    text_template: str = DEFAULT_TEMPLATE
    """Python format string over CSV columns, e.g. ``"Rating: {stars}\\n\\n{title}: {body}"``. Missing values become
    ''; set literals like {A,B} lose braces."""
    label_prefix: str | None = None
    """Label columns are those starting with this prefix, ordered by their numeric suffix."""
    label_columns: list[str] | None = None
    """Explicit label columns (overrides ``label_prefix``). With neither set, the label columns are detected: every
    column other than the id and the template's fields that holds only 0/1 values (the list is printed)."""
    label_names_csv: str | None = None
    """Optional CSV of human-readable class names (first column id, second column name)."""
    max_length: int = 256
    """Tokens; longer prompts are truncated (DLS prompts: median 40, max 127 with a Gemma tokenizer)."""
    submission_format: Literal["ids", "names", "onehot"] = "ids"
    """What ``infer submit`` writes after the id column: ``ids`` (a ``target`` column of space-separated class ids,
    as DLS asks), ``names`` (a ``labels`` column of space-separated label names) or ``onehot`` (one 0/1 column per
    label). ``infer submit --format`` overrides it."""


@dataclass
class DecodeArgs:
    """How probabilities become a label set (per-epoch eval, ``summary.json``, ``keep: best``, and the default of
    ``infer tune / submit / evaluate / blend``): the cascade tries ``start``, ``start - step``, ... ``stop`` in turn
    and takes every class above the first threshold that selects any; rows none selects get ``fallback``."""

    start: float = 0.55
    stop: float = 0.20
    step: float = 0.05
    fallback: str = "argmax"
    """A label name (e.g. a "no meaning" class), ``argmax`` (the most probable class: most multilabel data has at
    least one label a row) or ``none`` (an empty prediction is allowed)."""
    strategy: Literal["cascade", "sets"] = "cascade"
    """``sets``: the per-epoch evaluation (and ``keep: best``) also scores set decoding (:mod:`core.sets`, default
    lambda / temperature / candidates; the cascade above its cascade candidate) with set priors from the fold's
    training rows; ``infer tune --strategy sets`` tunes it on out-of-fold probabilities."""


@dataclass
class LossArgs:
    name: Literal["bce", "focal", "asymmetric"] = "bce"
    pos_weight: Literal["none", "sqrt", "balanced"] = "none"
    """BCE positive-class weight per label: none, sqrt(neg/pos) or neg/pos (clipped to ``pos_weight_max``)."""
    pos_weight_max: float = 10.0
    focal_gamma: float = 2.0
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05


@dataclass
class TrainArgs:
    num_epochs: int = 2
    lr: float = 2e-4
    head_lr: float | None = None
    """Learning rate of the classification head; ``None`` uses ``lr``."""
    lora_plus_ratio: float | None = None
    """LoRA+ (Hayou et al., 2024): the adapters' B matrices learn at ``lr * lora_plus_ratio`` (the paper uses ~16),
    the A matrices at ``lr``; ``None``: one learning rate for both."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    max_tokens_per_micro_batch: int | None = None
    """Split a micro-batch whose padded size (rows x longest row) exceeds this many tokens into pieces run one
    after another within the same optimizer step: the same gradient, the activation memory of the pieces. Lets a
    big ``micro_batch_size`` run the (many) short batches whole while the (few) long ones still fit. ``None``:
    never split."""
    grad_checkpointing: bool = False
    """Trade compute for memory; only needed for the largest models on small GPUs."""
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = "auto"
    """``auto``: bitsandbytes 8-bit AdamW on CUDA, torch AdamW on CPU."""
    group_by_length: bool = True
    """Length-grouped batches with dynamic padding (little padding, same randomness across batches)."""
    seed: int = 42
    eval_batch_size: int = 64
    save_every_steps: int = 200
    """Optimizer steps between resumable checkpoints (0 = only at epoch ends)."""
    max_steps: int | None = None
    """Stop each fold after this many optimizer steps (smoke tests, benchmarks)."""
    keep: Literal["last", "best"] = "last"
    """Which adapter is the fold's result (and source of its out-of-fold probabilities)."""
    nan_guard_steps: int = 20
    """Abort with a clear message if the loss is not finite during the first N optimizer steps."""
    parallel: Literal["auto", "single", "ddp", "split"] = "auto"
    """``ddp``: one 4-bit copy per rank (torchrun); ``split``: layers spread over all visible GPUs."""
    split_gpu_memory_gib: float = 12.0
    """``split``: GiB of each GPU the weights may fill; the rest is headroom for activations and the optimizer (a T4
    has 15 usable: 12 leaves 3, so transformers' placement spreads the 27B's ~15 GB of 4-bit weights over both GPUs
    instead of filling GPU 0 first)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the scalars of each optimizer step and epoch, as transformers' ``report_to``:
    ``tensorboard`` (the ``track`` extra; event files in ``output_dir/logs``), ``wandb``, ``mlflow``; ``[all]``:
    every one of them installed; ``[]`` or ``[none]``: none (docs/training.md, "Tracking and curves")."""


TRACKERS = ("tensorboard", "wandb", "mlflow")
"""The names ``train.report_to`` takes (besides ``all`` and ``none``)."""


@dataclass
class CVArgs:
    n_folds: int = 5
    folds: list[int] | None = None
    """Which folds to train (``None`` = all)."""
    seed: int | None = None
    """Seed of the fold split; ``None`` = ``train.seed``. Set it to vary ``train.seed`` (LoRA init, batch order)
    while keeping the split, so runs of different seeds are paired on the same folds."""
    final: bool = False
    """After the folds, also train the model to ship, ``output_dir/final/last``: every labelled row (and, distilling,
    every unlabelled one, on the fold-averaged teachers), the same settings and epochs as a fold, nothing held out
    (needs ``train.keep=last``); its ``thresholds.json`` is tuned on the folds' out-of-fold probabilities."""


@dataclass
class HubArgs:
    push_checkpoints_to: str | None = None
    """Hub repo id to push resumable checkpoints to while training (Kaggle's 12-hour limit)."""
    private: bool = True


@dataclass
class DistillArgs:
    """Knowledge distillation from cross-validated teacher runs (``python -m train distill``); off while ``teachers``
    is empty. The student of fold k learns from each teacher's fold-k model only (it never saw fold k's labels)."""

    teachers: list[str] = field(default_factory=list)
    """Teacher run folders: ``python -m train`` runs (their ``fold_K/<keep>`` adapters) or ``python -m train tfidf``
    runs (refit per fold); all on the student's folds (same ``folds.csv``)."""
    teacher_weights: list[float] | None = None
    """One weight per teacher for the mean of their soft targets; ``None``: equal weights."""
    alpha: float = 0.5
    """Weight of the hard-label loss; ``1 - alpha`` weighs the BCE against the teachers' soft targets (0: soft only,
    1: hard only). Unlabelled rows have the soft term only."""
    temperature: float = 1.0
    """Teacher targets are ``sigmoid(logit(p) / temperature)`` of each teacher probability (> 1 softens)."""
    unlabelled_csv: str | None = None
    """Rows without labels (the template's columns and the id column): added to the training rows of every fold
    (never to a validation fold) with the teachers' soft targets."""


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    quantization: QuantizationArgs = field(default_factory=QuantizationArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    decode: DecodeArgs = field(default_factory=DecodeArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    cv: CVArgs = field(default_factory=CVArgs)
    hub: HubArgs = field(default_factory=HubArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    output_dir: str = "adapters/run"

    @property
    def split_seed(self) -> int:
        """The seed of the fold split: ``cv.seed``, else ``train.seed``."""
        return self.train.seed if self.cv.seed is None else self.cv.seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
        cfg = _build(cls, raw or {}, prefix="", source=source)
        validate(cfg, source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
        raw, source = read_yaml(path, overrides)
        return cls.from_dict(raw, source=source)


def read_yaml(path: str | Path | None, overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """A config file's mapping (``{}`` without a file) with the ``key=value`` overrides applied, and its name for
    messages. With :func:`build`, how every config dataclass is loaded (the run's, the pipeline's)."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        apply_override(raw, item)
    return raw, source


def build(cls: type, raw: dict[str, Any], source: str = "<dict>") -> Any:
    """The config dataclass ``cls`` from a mapping: unknown keys and wrong types raise ConfigError naming the key."""
    return _build(cls, raw or {}, prefix="", source=source)


def add_config_arguments(parser) -> None:
    """``--config``, ``--set KEY=VALUE`` and ``--print-config``: how every config-driven command takes its config."""
    parser.add_argument("--config", help="YAML config (see configs/); defaults to the embedded Gemma 3 270M setup")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.num_epochs=1 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


REMOVED_KEYS = {"data.test_csv": None, "train.log_every_steps": 10, "distill.final": False}
"""Keys that did nothing and were removed; a saved ``run_config.yaml`` that has them at their old default still
loads (older adapter folders), any other value is an error like any unknown key."""

MOVED_KEYS = {"distill.final": "cv.final"}
"""Keys that moved: any value other than the old default (:data:`REMOVED_KEYS`) is an error naming the new key."""


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    raw = {k: v for k, v in raw.items() if REMOVED_KEYS.get(prefix + k, object()) != v}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    moved = [(prefix + k, MOVED_KEYS[prefix + k]) for k in unknown if prefix + k in MOVED_KEYS]
    if moved:
        raise ConfigError(f"{source}: " + "; ".join(f"{old} moved to {new} (one final model for plain and distilled "
                                                     f"runs): set {new} instead (or pass --final)"
                                                     for old, new in moved))
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"{source}: unknown config key(s): {keys} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source)
    return cls(**kwargs)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".", source)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {_coerce(args[0], k, f"{key} (a key)", source): _coerce(args[1], v, f"{key}.{k}", source)
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string: --set train.lr=1e-4
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Cross-field checks; gathers every problem into one ConfigError."""
    problems = []
    t, lo, cv = cfg.train, cfg.lora, cfg.cv
    for key, v in [("train.num_epochs", t.num_epochs), ("train.micro_batch_size", t.micro_batch_size),
                   ("train.grad_accum_steps", t.grad_accum_steps), ("train.eval_batch_size", t.eval_batch_size),
                   ("lora.r", lo.r), ("data.max_length", cfg.data.max_length)]:
        if v < 1:
            problems.append(f"{key} must be >= 1, got {v}")
    if t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    for key, v in [("train.head_lr", t.head_lr), ("train.lora_plus_ratio", t.lora_plus_ratio)]:
        if v is not None and v <= 0:
            problems.append(f"{key} must be > 0 (or null), got {v}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if not 0 <= lo.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules:
        problems.append("lora.target_modules must not be empty")
    if cv.n_folds < 2:
        problems.append(f"cv.n_folds must be >= 2, got {cv.n_folds}")
    if cv.folds is not None:
        bad = [f for f in cv.folds if not 0 <= f < cv.n_folds]
        if bad or not cv.folds:
            problems.append(f"cv.folds must be a non-empty list of fold indices in [0, {cv.n_folds}), got {cv.folds}")
    if cfg.model.num_labels is not None and cfg.model.num_labels < 1:
        problems.append(f"model.num_labels must be >= 1, got {cfg.model.num_labels}")
    d = cfg.decode
    if d.step <= 0:
        problems.append(f"decode.step must be > 0, got {d.step}")
    if not 0 <= d.stop <= d.start <= 1:
        problems.append(f"decode.stop and decode.start must satisfy 0 <= stop <= start <= 1, got {d.stop}, {d.start}")
    if not d.fallback.strip():
        problems.append("decode.fallback must be a label name, 'argmax' or 'none'")
    if t.max_tokens_per_micro_batch is not None and t.max_tokens_per_micro_batch < 1:
        problems.append(f"train.max_tokens_per_micro_batch must be >= 1 (or null), got {t.max_tokens_per_micro_batch}")
    if t.split_gpu_memory_gib <= 0:
        problems.append(f"train.split_gpu_memory_gib must be > 0, got {t.split_gpu_memory_gib}")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps must be >= 1, got {t.max_steps}")
    unknown = [r for r in t.report_to if r not in (*TRACKERS, "all", "none")]
    if unknown or (len(t.report_to) > 1 and {"all", "none"} & set(t.report_to)):
        problems.append(f"train.report_to must list trackers of {list(TRACKERS)}, or be [all] or [none], "
                        f"got {t.report_to}")
    problems += _distill_problems(cfg.distill)
    if cv.final and t.keep != "last":
        problems.append("cv.final needs train.keep=last (the final model has no validation rows to pick a best "
                        "epoch: it trains the folds' epochs)")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _distill_problems(d: DistillArgs) -> list[str]:
    problems = []
    if not 0 <= d.alpha <= 1:
        problems.append(f"distill.alpha must be in [0, 1], got {d.alpha}")
    if d.temperature <= 0:
        problems.append(f"distill.temperature must be > 0, got {d.temperature}")
    if d.teacher_weights is not None:
        if len(d.teacher_weights) != len(d.teachers):
            problems.append(f"distill.teacher_weights has {len(d.teacher_weights)} weights for "
                            f"{len(d.teachers)} teachers")
        elif any(w < 0 for w in d.teacher_weights) or not sum(d.teacher_weights) > 0:
            problems.append(f"distill.teacher_weights must be >= 0 with a positive sum, got {d.teacher_weights}")
    if not d.teachers and d.unlabelled_csv:
        problems.append("distill.unlabelled_csv needs distill.teachers (unlabelled rows learn from soft targets only)")
    if d.teachers and d.unlabelled_csv and d.alpha == 1:
        problems.append("distill.alpha=1 (hard labels only) gives distill.unlabelled_csv's rows no loss; "
                        "lower alpha or drop the unlabelled rows")
    return problems
