"""core.decoding: which decoder applies to a probability file or an adapter. A thresholds file (cascade or sets,
checked against the labels), else the producing run's ``decode`` section (found in the file's ``.meta.json`` or
beside it; a file without one decodes with the generic default and says so), else an adapter's own config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from core.adapter import AdapterRef
from core.config import RunConfig
from core.decoding import (
    adapter_default_spec,
    adapter_spec,
    check_spec_labels,
    default_spec,
    labels_id_column,
    read_thresholds,
    run_config_of,
)
from core.errors import InputError
from core.io import write_probs
from core.sets import SetDecoder
from core.thresholds import ThresholdSpec

NAMES = ["a", "b", "c"]


def probs_file(folder: Path, config: str | None = None, meta: dict | None = None) -> Path:
    """A small probability file; ``config`` the run_config.yaml written beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "oof.csv"
    write_probs(path, [1, 2, 3, 4], np.random.default_rng(0).random((4, 3)), NAMES, meta=meta)
    if config is not None:
        (folder / "run_config.yaml").write_text(config)
    return path


def test_read_thresholds_reads_a_cascade_or_a_set_decoding(tmp_path):
    spec = ThresholdSpec(tuple(NAMES), 0.6, 0.2, 0.1, 2, (0.0, 0.05, -0.05))
    old = tmp_path / "cascade.json"   # files written before set decoding carry no strategy key
    old.write_text(json.dumps(spec.to_dict()))
    got = read_thresholds(old)
    assert isinstance(got, ThresholdSpec) and got.to_dict() == spec.to_dict()
    dec = SetDecoder.fit(np.eye(3, dtype=np.int8), NAMES, spec, lam=1.0)
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps(dec.to_dict()))
    assert isinstance(read_thresholds(sets), SetDecoder)


@pytest.mark.parametrize("content, message", [
    (None, "thresholds file not found"),
    ("not json", "cannot read JSON"),
    ({"label_names": []}, "'label_names' must be a non-empty list"),
    ({"label_names": NAMES, "class_offsets": [0.1]}, "invalid thresholds"),
    ({"label_names": NAMES, "fallback": 7}, "invalid thresholds"),
    ({"label_names": NAMES, "strategy": "magic"}, "unknown decoding strategy 'magic'"),
])
def test_a_bad_thresholds_file_is_an_input_error_naming_it(tmp_path, content, message):
    path = tmp_path / "thresholds.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputError, match=message) as e:
        read_thresholds(path)
    assert str(path) in str(e.value)


def test_thresholds_must_be_for_the_files_labels():
    spec = ThresholdSpec(tuple(NAMES))
    check_spec_labels(spec, "t.json", list(reversed(NAMES)), "p.csv")   # the order may differ
    with pytest.raises(InputError, match="different label set"):
        check_spec_labels(spec, "t.json", ["a", "b", "z"], "p.csv")


def test_default_spec_is_the_producing_runs_decode_section(tmp_path, caplog):
    beside = probs_file(tmp_path / "run", "decode:\n  fallback: c\n  start: 0.6\n")
    spec = default_spec(beside, NAMES)
    assert spec.fallback == 2 and spec.start == 0.6
    assert default_spec(beside, NAMES, fallback="argmax").fallback == "argmax"   # --fallback overrides it
    cfg = RunConfig.from_yaml(tmp_path / "run" / "run_config.yaml").to_dict()
    in_meta = probs_file(tmp_path / "elsewhere", meta={"config": cfg})   # the .meta.json's config comes first
    assert run_config_of(in_meta)[1].endswith(".meta.json") and default_spec(in_meta, NAMES).fallback == 2
    with caplog.at_level(logging.INFO, logger="core.decoding"):
        orphan = probs_file(tmp_path / "orphan")
        assert default_spec(orphan, NAMES).fallback == "argmax"
    assert "no run config" in caplog.text and "falls back to argmax" in caplog.text   # said, not silent


def test_a_fallback_that_is_not_a_label_names_the_run_config(tmp_path):
    path = probs_file(tmp_path / "run", "decode:\n  fallback: no_such_label\n")
    with pytest.raises(InputError, match="decode.fallback of .*run_config.yaml.*no_such_label"):
        default_spec(path, NAMES)
    with pytest.raises(InputError, match="--fallback"):
        default_spec(path, NAMES, fallback="zz")


def test_labels_id_column_is_given_else_the_runs_else_index(tmp_path):
    path = probs_file(tmp_path / "run", "data:\n  id_column: review_id\n")
    assert labels_id_column(path, "given") == "given"
    assert labels_id_column(path) == "review_id"
    assert labels_id_column(probs_file(tmp_path / "orphan")) == "index"


def test_adapter_spec_puts_a_thresholds_file_in_the_adapters_label_order(tmp_path):
    cfg = RunConfig.from_dict({"decode": {"fallback": "c"}})
    ref = AdapterRef(spec="x", folder=tmp_path, cfg=cfg, label_names=list(NAMES))
    assert adapter_default_spec(ref).fallback == 2 and adapter_spec(ref).fallback == 2
    spec = ThresholdSpec(tuple(reversed(NAMES)), 0.6, 0.2, 0.1, 0, (0.1, 0.2, 0.3))   # fallback "c", other order
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(spec.to_dict()))
    got = adapter_spec(ref, path)
    assert list(got.label_names) == NAMES and got.fallback == 2 and got.class_offsets == (0.3, 0.2, 0.1)
    probs = np.random.default_rng(1).random((20, 3))
    np.testing.assert_array_equal(got.decode(probs), spec.decode(probs[:, ::-1])[:, ::-1])
    bad = RunConfig.from_dict({"decode": {"fallback": "zz"}})
    with pytest.raises(InputError, match="decode.fallback"):
        adapter_default_spec(AdapterRef(spec="y", folder=tmp_path, cfg=bad, label_names=list(NAMES)))
