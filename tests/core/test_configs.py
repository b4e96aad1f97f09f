"""Every shipped YAML config loads; bad keys, types and values are rejected with the key named; --set coerces."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import EMBEDDED_MODEL, RunConfig, apply_override
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "pipeline.yaml")
"""Run configs; the pipeline configs (configs/*/pipeline.yaml) are tests/train/test_pipeline.py's."""


def test_configs_exist():
    assert len(CONFIGS) >= 4, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_loads_and_round_trips(path):
    cfg = RunConfig.from_yaml(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    # What the file says is what the config holds (spot-check every scalar of every section).
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == value, f"{path}: {section}.{key} = {got!r}, file says {value!r}"
        else:
            assert getattr(cfg, section) == values
    # to_yaml -> from_dict gives the same config (run_config.yaml in adapter folders relies on it).
    again = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.output_dir.startswith("adapters/")


def test_defaults_are_the_embedded_model():
    cfg = RunConfig.from_yaml(None)
    assert cfg.model.name_or_path == EMBEDDED_MODEL
    assert cfg == RunConfig()


@pytest.mark.parametrize("raw, key", [
    ({"trian": {"lr": 1e-4}}, "trian"),
    ({"train": {"lrr": 1e-4}}, "train.lrr"),
    ({"model": {"name": "x"}}, "model.name"),
    ({"lora": {"rank": 8}}, "lora.rank"),
    ({"output": "x"}, "output"),
])
def test_unknown_key_is_named(raw, key):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        RunConfig.from_dict(raw, source="my.yaml")
    assert key in str(e.value)
    assert "my.yaml" in str(e.value)


@pytest.mark.parametrize("raw, key", [
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"num_epochs": 1.5}}, "train.num_epochs"),
    ({"train": {"num_epochs": True}}, "train.num_epochs"),
    ({"train": {"group_by_length": "yes"}}, "train.group_by_length"),
    ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules"),
    ({"lora": {"target_modules": ["q_proj", 3.5j]}}, "lora.target_modules[1]"),
    ({"cv": {"folds": [0, "one"]}}, "cv.folds[1]"),
    ({"model": {"num_labels": "20"}}, "model.num_labels"),
    ({"train": 3}, "train"),
])
def test_wrong_type_is_named(raw, key):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(raw, source="my.yaml")
    assert key in str(e.value)


@pytest.mark.parametrize("raw, key, allowed", [
    ({"loss": {"name": "cross_entropy"}}, "loss.name", "bce"),
    ({"train": {"scheduler": "Cosine"}}, "train.scheduler", "cosine"),
    ({"train": {"keep": "LAST"}}, "train.keep", "best"),
    ({"model": {"dtype": "fp16"}}, "model.dtype", "float16"),
    ({"quantization": {"quant_type": "int4"}}, "quantization.quant_type", "nf4"),
    ({"train": {"parallel": "fsdp"}}, "train.parallel", "ddp"),
])
def test_bad_literal_is_named_with_choices(raw, key, allowed):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(raw)
    assert key in str(e.value) and allowed in str(e.value)


@pytest.mark.parametrize("raw, key", [
    ({"cv": {"n_folds": 1}}, "cv.n_folds"),
    ({"cv": {"n_folds": 3, "folds": [3]}}, "cv.folds"),
    ({"cv": {"folds": []}}, "cv.folds"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"model": {"num_labels": 0}}, "model.num_labels"),
    ({"decode": {"step": 0.0}}, "decode.step"),
    ({"decode": {"start": 0.3, "stop": 0.5}}, "decode.stop"),
    ({"decode": {"fallback": " "}}, "decode.fallback"),
    ({"data": {"max_length": 0}}, "data.max_length"),
    ({"train": {"lora_plus_ratio": 0}}, "train.lora_plus_ratio"),
])
def test_inconsistent_values_are_named(raw, key):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(raw)
    assert key in str(e.value)


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"train": {"lr": -1.0, "num_epochs": 0}})
    assert "train.lr" in str(e.value) and "train.num_epochs" in str(e.value)


def test_overrides_coerce_types():
    cfg = RunConfig.from_yaml(ROOT / "configs/gemma-3-270m/qlora.yaml", [
        "train.lr=1e-4",            # YAML 1.1 reads this as a string; it must still become a float
        "train.head_lr=5E-3",
        "train.weight_decay=0",     # an int where a float is expected
        "train.num_epochs=3",
        "train.group_by_length=false",
        "cv.folds=[0, 2]",
        "model.num_labels=20",
        "data.label_names_csv=",    # empty value -> None
        "output_dir=/tmp/some run",
        "lora.target_modules=[q_proj, v_proj]",
        "model.gguf_file=null",
    ])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.head_lr == pytest.approx(5e-3)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.num_epochs == 3 and cfg.train.group_by_length is False
    assert cfg.cv.folds == [0, 2]
    assert cfg.model.num_labels == 20
    assert cfg.data.label_names_csv is None
    assert cfg.output_dir == "/tmp/some run"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    # Untouched values still come from the file.
    assert cfg.train.micro_batch_size == 16 and cfg.data.train_csv == "data/sample_train.csv"


@pytest.mark.parametrize("item, key", [
    ("train.lr", "train.lr"),                 # no '='
    ("train.lrr=1", "train.lrr"),
    ("train.num_epochs=two", "train.num_epochs"),
    ("train.lr.x=1", "train.lr"),
    ("cv.folds=[7]", "cv.folds"),
])
def test_bad_overrides_are_named(item, key):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_yaml(None, [item])
    assert key in str(e.value)


def test_override_into_non_section():
    raw = {"output_dir": "x"}
    with pytest.raises(ConfigError, match="output_dir"):
        apply_override(raw, "output_dir.sub=1")


def test_yaml_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        RunConfig.from_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        RunConfig.from_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="scalar.yaml"):
        RunConfig.from_yaml(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  nm_epochs: 1\n")
    with pytest.raises(ConfigError) as e:
        RunConfig.from_yaml(typo)
    assert "typo.yaml" in str(e.value) and "train.nm_epochs" in str(e.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert RunConfig.from_yaml(empty) == RunConfig()


def test_removed_keys_load_at_their_old_default_only():
    """Adapter folders saved before data.test_csv / train.log_every_steps were removed still load."""
    old = RunConfig().to_dict()
    old["data"]["test_csv"] = None
    old["train"]["log_every_steps"] = 10
    assert RunConfig.from_dict(old) == RunConfig()
    old["data"]["test_csv"] = "test.csv"
    with pytest.raises(ConfigError, match="data.test_csv"):
        RunConfig.from_dict(old)
