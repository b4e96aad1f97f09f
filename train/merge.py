"""One adapter instead of k: the fold adapters of one or more runs (seeds) merged with peft's
``add_weighted_adapter``, their score heads averaged; and the tuned thresholds that a merged or final adapter
carries (:func:`tune_thresholds`).

Usage:
    python -m train merge --run RUN [--run RUN2 ...] [--method cat|svd] --out DIR

What is merged. Fold adapter i adds ``delta_i = B_i A_i * s_i`` to each adapted weight (``s_i = lora_alpha / r``).
With equal weights ``w_i = 1/n`` over the n adapters (every finished fold of every run):

* ``cat`` (default, exact): peft (0.21) stacks the ranks, ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]`` (weight and
  scaling on A, no square root), ``B = [B_1 ... B_n]``, and sets ``r = lora_alpha = sum r_i`` (scaling 1), so
  ``B A = mean_i delta_i`` exactly. Rank n x r: one forward pass with n x r LoRA ranks instead of n forward passes.
* ``svd``: the mean delta truncated to rank r (peft's task arithmetic, then SVD): the size of one fold adapter, an
  approximation; ``adapter_info.json`` records how far it is from the mean delta (relative Frobenius error).

The score head (``modules_to_save``: a linear layer on the last token) is averaged entry-wise in fp32. The merged
model is not the average of the fold models' probabilities (a model is not linear in its weights); the outer split
of ``benchmarks/outer.py`` measures how close it comes.

The output is an ordinary adapter folder (``predict``, ``serve``, ``export``, ``push`` take it): the adapter files,
the first adapter's tokenizer, ``run_config.yaml`` (the first run's, its ``lora.r`` / ``alpha`` the merged ones),
``label_names.json``, ``adapter_info.json`` (key ``merged``: the adapters, method, weights, error) and
``thresholds.json`` tuned on the runs' out-of-fold probabilities (several runs: their mean), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.adapter import ADAPTER_CONFIG, CONFIG_FILE, WEIGHT_FILES, AdapterRef, run_adapters, save_adapter
from core.config import RunConfig
from core.decoding import THRESHOLDS_FILE
from core.errors import ConfigError, InputError
from core.io import OPTIMISTIC_KEY, atomic_dir, check_out_dir, optimistic_reason, read_oof, write_json, write_probs

logger = logging.getLogger(__name__)

METHODS = ("cat", "svd")


@dataclass
class Source:
    """One ``--run``: its config, its finished fold adapters and its out-of-fold file."""

    run_dir: Path
    cfg: RunConfig
    refs: list[AdapterRef]

    @property
    def oof(self) -> Path:
        return self.run_dir / "oof.csv"


# ------------------------------------------------------------------------------------------------- the inputs


def read_runs(runs: list[str]) -> list[Source]:
    """Validate every ``--run``: a run folder with finished fold adapters, its ``oof.csv``, ``folds.csv`` and
    labelled CSV (the thresholds are tuned on them), and adapters that can be merged (:func:`check_mergeable`).

    Raises:
        InputError: naming the run or adapter folder and what is wrong.
    """
    if not runs:
        raise InputError("python -m train merge needs --run RUN (repeatable)")
    out, seen = [], set()
    for spec in runs:
        path = Path(spec)
        if not path.is_dir():
            raise InputError(f"--run {spec}: run folder not found")
        if path.resolve() in seen:
            raise InputError(f"--run {spec}: given twice")
        seen.add(path.resolve())
        if not (path / CONFIG_FILE).is_file():
            raise InputError(f"--run {spec}: not a run folder of python -m train (no {CONFIG_FILE})")
        try:
            cfg = RunConfig.from_yaml(path / CONFIG_FILE)
        except ConfigError as e:
            raise InputError(str(e)) from None
        source = Source(path, cfg, run_adapters(path, spec))
        for need, what in [(source.oof, "out-of-fold probabilities"), (path / "folds.csv", "fold assignment")]:
            if not need.is_file():
                raise InputError(f"{need}: missing ({what}: the merged adapter's thresholds are tuned on them; is "
                                 f"the run finished?)")
        if not Path(cfg.data.train_csv).is_file():
            raise InputError(f"{path / CONFIG_FILE}: data.train_csv {cfg.data.train_csv} not found (the labels of "
                             f"the out-of-fold rows; run the merge where the run's data is)")
        out.append(source)
    check_mergeable([r for s in out for r in s.refs])
    return out


def lora_setup(ref: AdapterRef) -> dict:
    """What adapters must share to be merged: the LoRA setup of ``adapter_config.json``."""
    try:
        c = json.loads((ref.folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{ref.folder / ADAPTER_CONFIG}: cannot read JSON: {e}") from None
    tm = c.get("target_modules")
    return {"r": c.get("r"), "lora_alpha": c.get("lora_alpha"), "rank_pattern": c.get("rank_pattern") or {},
            "alpha_pattern": c.get("alpha_pattern") or {},
            "target_modules": sorted(tm) if isinstance(tm, list) else tm,
            "layers_to_transform": c.get("layers_to_transform"), "use_dora": bool(c.get("use_dora")),
            "use_rslora": bool(c.get("use_rslora"))}


def check_mergeable(refs: list[AdapterRef]) -> None:
    """Every adapter on the first one's base model, labels, prompt and LoRA setup; no DoRA / rsLoRA, safetensors only.

    Raises:
        InputError: naming the adapter that differs, and how.
    """
    first = refs[0]
    want = lora_setup(first)
    for ref in refs:
        if not (ref.folder / WEIGHT_FILES[0]).is_file():
            raise InputError(f"{ref.folder}: no {WEIGHT_FILES[0]} (an adapter_model.bin is a pickle: never loaded)")
        setup = lora_setup(ref)
        if setup["use_dora"] or setup["use_rslora"]:
            raise InputError(f"{ref.folder}: a {'DoRA' if setup['use_dora'] else 'rsLoRA'} adapter: peft's "
                             f"add_weighted_adapter does not merge it exactly (DoRA's magnitudes, rsLoRA's scaling)")
        m, m0 = ref.cfg.model, first.cfg.model
        checks = [("base model", (m.name_or_path, m.gguf_file), (m0.name_or_path, m0.gguf_file)),
                  ("labels", ref.label_names, first.label_names),
                  ("prompt (data.text_template, data.max_length)", (ref.cfg.data.text_template,
                   ref.cfg.data.max_length), (first.cfg.data.text_template, first.cfg.data.max_length))]
        checks += [(f"LoRA {k}", setup[k], want[k]) for k in want]
        for what, got, expected in checks:
            if got != expected:
                got, expected = ((f"{len(v)} labels {v[:3]}..." if what == "labels" else repr(v))
                                 for v in (got, expected))
                raise InputError(f"{ref.folder}: {what} {got} differs from {first.folder}'s {expected}: only "
                                 f"adapters of one base, label set, prompt and LoRA setup merge")


# ------------------------------------------------------------------------------------------------- the merge


def merge_lora(refs: list[AdapterRef], method: str = "cat", device=None) -> tuple[dict, object, object]:
    """The merged adapter's tensors (LoRA by ``add_weighted_adapter``, equal weights; the score head averaged in
    fp32), its peft ``LoraConfig`` and the first adapter's tokenizer.

    The base is loaded as the adapters were trained (4-bit where configured) with fp32 compute, so the LoRA weights
    are combined in fp32. peft refuses to combine adapters that each hold ``modules_to_save`` (the score head), so
    the LoRA weights are loaded without it and the heads are averaged here.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from core.model import load_classifier, load_tokenizer, resolve_model_path

    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    first = refs[0]
    device = torch.device(device) if device is not None else (
        torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    margs = dataclasses.replace(first.cfg.model, dtype="float32")
    base, _, _ = load_classifier(resolve_model_path(margs, log=logger.info), len(first.label_names), margs,
                                 first.cfg.quantization, device)
    tok = load_tokenizer(str(first.folder))
    saved = LoraConfig.from_pretrained(str(first.folder))
    lora_only = dataclasses.replace(saved, modules_to_save=None, task_type=None, inference_mode=True)
    model, names, heads = None, [], []
    for i, ref in enumerate(refs):
        tensors = load_file(str(ref.folder / WEIGHT_FILES[0]))
        lora = {k: v for k, v in tensors.items() if ".lora_" in k}
        heads.append({k: v.float() for k, v in tensors.items() if ".lora_" not in k})
        name = f"a{i}"
        if model is None:
            model = get_peft_model(base, lora_only, adapter_name=name)
        else:
            model.add_adapter(name, lora_only)
        result = set_peft_model_state_dict(model, lora, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and ".lora_" in k]
        if missing or result.unexpected_keys:
            raise InputError(f"{ref.folder / WEIGHT_FILES[0]}: its LoRA weights do not fit the base (missing "
                             f"{missing[:2]}, unexpected {list(result.unexpected_keys)[:2]})")
        names.append(name)
    keys = set(heads[0])
    for ref, head in zip(refs, heads):
        if set(head) != keys or any(head[k].shape != heads[0][k].shape for k in keys):
            raise InputError(f"{ref.folder / WEIGHT_FILES[0]}: score head tensors {sorted(head)} differ from "
                             f"{first.folder}'s {sorted(keys)}")
    n = len(refs)
    r = saved.r
    model.add_weighted_adapter(names, [1.0 / n] * n, "merged", combination_type=method,
                               svd_rank=r if method == "svd" else None)
    merged_cfg = model.peft_config["merged"]
    out = {k: v.detach().float().cpu().contiguous()
           for k, v in get_peft_model_state_dict(model, adapter_name="merged").items()}
    out.update({k: torch.stack([h[k] for h in heads]).mean(0).contiguous() for k in sorted(keys)})
    config = dataclasses.replace(saved, r=merged_cfg.r, lora_alpha=merged_cfg.lora_alpha, rank_pattern={},
                                 alpha_pattern={}, inference_mode=True)
    return out, config, tok


def delta_error(refs: list[AdapterRef], merged: dict, config) -> dict:
    """How far the merged adapter's delta ``B A * lora_alpha / r`` is from the mean of the adapters' deltas:
    relative Frobenius error per adapted weight, its max and mean (about 1e-7 for ``cat``: float rounding)."""
    import torch
    from safetensors.torch import load_file

    sources = [load_file(str(r.folder / WEIGHT_FILES[0])) for r in refs]
    scales = [lora_setup(r)["lora_alpha"] / lora_setup(r)["r"] for r in refs]
    errors = []
    for key_a in [k for k in merged if k.endswith("lora_A.weight")]:
        key_b = key_a.replace("lora_A", "lora_B")
        mean = sum(s[key_b].double() @ s[key_a].double() * c for s, c in zip(sources, scales)) / len(sources)
        got = merged[key_b].double() @ merged[key_a].double() * (config.lora_alpha / config.r)
        errors.append(float(torch.linalg.norm(got - mean) / max(float(torch.linalg.norm(mean)), 1e-30)))
    return {"max": max(errors), "mean": float(np.mean(errors)), "weights": len(errors)}


class MergedAdapter:
    """What :func:`core.adapter.save_adapter` saves (``save_pretrained``): the merged tensors and ``LoraConfig``."""

    def __init__(self, tensors: dict, config):
        self.tensors, self.config = tensors, config

    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        self.config.save_pretrained(str(folder))
        save_file(self.tensors, str(Path(folder) / WEIGHT_FILES[0]), metadata={"format": "pt"})


def merge(runs: list[str], out: str | Path, method: str = "cat", device=None) -> dict:
    """Merge every finished fold adapter of ``runs`` into one adapter folder ``out`` (see the module doc); returns
    its ``adapter_info.json``.

    Raises:
        InputError: ``out`` exists or cannot be written, a run or adapter is missing or differs (checked before
            the model loads), or tuning the thresholds failed.
    """
    out = Path(out)
    check_out_dir(out, "--out", must_not_exist=True)
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    sources = read_runs(runs)
    refs = [r for s in sources for r in s.refs]
    first = sources[0].cfg
    logger.info(f"merge: {len(refs)} adapters of {len(sources)} run(s) by {method} "
                + ", ".join(r.name if len(sources) == 1 else f"{r.folder}" for r in refs))
    with tempfile.TemporaryDirectory(prefix="qlml-merge-") as work:
        oof, nested = mean_oof(sources, Path(work))
        thresholds = tune_thresholds(
            oof, first.data.train_csv, sources[0].run_dir / "folds.csv", first.decode.strategy, nested,
            {"for": str(out), "tuned_on": "out-of-fold probabilities of the merged runs' folds (each row predicted by "
                                          "the fold model that did not train on it; several runs: their mean), "
                                          "never by the merged adapter",
             "oof": [str(s.oof) for s in sources]})
        thresholds["meta"]["oof"] = " + ".join(str(s.oof) for s in sources)  # not the temporary mean's path
    tensors, config, tok = merge_lora(refs, method, device)
    error = delta_error(refs, tensors, config)
    logger.info(f"merge: rank {config.r}; merged delta vs the mean of the {len(refs)} deltas: relative Frobenius "
                f"error max {error['max']:.2e}, mean {error['mean']:.2e} over {error['weights']} weights")
    cfg = dataclasses.replace(first, output_dir=str(out),
                              lora=dataclasses.replace(first.lora, r=config.r, alpha=config.lora_alpha))
    info = {"merged": {"method": method, "weights": [1.0 / len(refs)] * len(refs),
                       "adapters": [str(r.folder) for r in refs], "runs": [str(s.run_dir) for s in sources],
                       "rank": config.r, "lora_alpha": config.lora_alpha, "delta_vs_mean": error,
                       "by": f"peft add_weighted_adapter ({method}, equal weights; versions below), score heads "
                             f"averaged"},
            "thresholds": THRESHOLDS_FILE}
    with atomic_dir(out) as tmp:
        # save_adapter writes a folder atomically too: it replaces the (empty) tmp, which then gets the thresholds.
        save_adapter(MergedAdapter(tensors, config), tok, tmp, cfg, refs[0].label_names, refs[0].descriptions, info)
        write_json(tmp / THRESHOLDS_FILE, thresholds)
    logger.info(f"wrote {out} (python -m infer predict --adapter {out} ...; its {THRESHOLDS_FILE} decodes)")
    return json.loads((out / "adapter_info.json").read_text())


# --------------------------------------------------------------------------------------------------- thresholds


def mean_oof(sources: list[Source], work: Path) -> tuple[Path, bool]:
    """The out-of-fold file the thresholds are tuned on: one run's ``oof.csv``, or the mean of several runs' (same
    rows required) written to ``work``; and whether a nested estimate is honest on it (not with ``keep: best``)."""
    nested = not any(optimistic_reason(s.oof) for s in sources)
    if len(sources) == 1:
        return sources[0].oof, nested
    ids0, probs0, names, _ = read_oof(sources[0].oof)
    order = {str(i): j for j, i in enumerate(ids0)}
    total = probs0.copy()
    for s in sources[1:]:
        ids, probs, _, _ = read_oof(s.oof, names)
        keys = [str(i) for i in ids]
        if len(keys) != len(order) or any(k not in order for k in keys):
            raise InputError(f"{s.oof}: out-of-fold rows differ from {sources[0].oof}'s ({len(keys)} vs "
                             f"{len(order)} rows): merge runs of one data set and the same finished folds")
        total[[order[k] for k in keys]] += probs
    path = work / "oof.csv"
    reasons = [r for r in (optimistic_reason(s.oof) for s in sources) if r]
    write_probs(path, ids0, total / len(sources), names,
                meta={"kind": "out-of-fold probabilities", "config": sources[0].cfg.to_dict(),
                      "mean_of": [str(s.oof) for s in sources], **({OPTIMISTIC_KEY: reasons[0]} if reasons else {})})
    return path, nested


def tune_thresholds(oof: Path, labels: str | Path, folds: Path, strategy: str, nested: bool,
                    provenance: dict) -> dict:
    """``thresholds.json`` contents tuned on ``oof`` by :func:`core.tuning.run_tune` with ``python -m infer tune``'s
    defaults (exact match, seeded; the nested estimate of the gain unless ``nested`` is False), its report logged;
    ``provenance`` is added to its ``meta`` under ``adapter_thresholds``. Nothing is written: the caller writes it.

    Raises:
        InputError: the tuner failed (its message).
    """
    from core.tuning import run_tune  # here: it imports scikit-learn (1 s), which merging adapters never needs

    logger.info(f"thresholds: tuned on {oof} (labels {labels}, folds {folds}" + ("" if nested else ", not nested")
                + ")")
    try:
        doc = run_tune(oof, labels, None, folds=folds, strategy=strategy, nested=nested, progress=False).to_dict()
    except (InputError, ConfigError) as e:
        raise InputError(f"tuning thresholds on {oof} failed: {e}") from e
    doc.setdefault("meta", {})["adapter_thresholds"] = provenance
    return doc
