"""Integration test with the real embedded Gemma 3 270M (registry GGUF, converted once to a cached HF folder):
load in 4-bit, a few optimizer steps, save, reload from the adapter folder, same probabilities."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from trainkit import ROOT, write_rows

from core.config import RunConfig
from core.data import read_csv, tokenize
from core.io import read_probs
from core.model import load_classifier, load_tokenizer, predict_probs, resolve_model_path
from train.run import main

pytestmark = pytest.mark.slow


def test_gemma3_270m_train_save_reload(tmp_path):
    from peft import PeftModel

    csv = write_rows(tmp_path / "train.csv", 40)
    out = tmp_path / "run"
    cfg = RunConfig.from_yaml(ROOT / "configs/gemma-3-270m/qlora.yaml", [
        f"data.train_csv={csv}", f"data.label_names_csv={ROOT / 'data/sample_trends.csv'}", "data.max_length=64",
        "train.max_steps=3", "train.num_epochs=1", "train.micro_batch_size=8", "train.eval_batch_size=32",
        "cv.n_folds=2", "cv.folds=[0]", f"output_dir={out}"])
    summary = main(cfg)

    fold = out / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["steps"] == 3 and summary["folds"] == [0]
    labels = json.loads((out / "label_names.json").read_text())
    assert labels["descriptions"]["trend_id_res0"] == "Долгая доставка"
    info = json.loads((fold / "last" / "adapter_info.json").read_text())
    assert info["base_model"] == "google/gemma-3-270m" and info["num_labels"] == 20
    weights = load_file(fold / "last" / "adapter_model.safetensors")
    assert any("score" in k for k in weights)
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)   # lora_B starts at 0: trained
    lora_layers = {k.split(".layers.")[1].split(".")[0] for k in weights if "lora_A" in k}
    assert len(lora_layers) == 18                                                   # every layer adapted

    # Reload: a fresh 4-bit base (another head seed) + the adapter folder reproduces the saved probabilities.
    path = resolve_model_path(cfg.model)
    base, _, dtype = load_classifier(path, 20, cfg.model, cfg.quantization, torch.device("cpu"), seed=999)
    model = PeftModel.from_pretrained(base, str(fold / "last"))
    tok = load_tokenizer(str(fold / "last"))
    ds = read_csv(csv, cfg.data)
    val = np.flatnonzero(pd.read_csv(out / "folds.csv")["fold"].to_numpy() == 0)
    probs = predict_probs(model, tokenize([ds.texts[i] for i in val], tok, 64), tok.pad_token_id, 5, dtype,
                          progress=False)
    saved = np.load(fold / "val_probs_last.npy")
    np.testing.assert_allclose(probs, saved, atol=1e-5)
    ids, oof, _ = read_probs(out / "oof.csv", ds.label_names)
    assert list(ids) == list(ds.ids[val])
    np.testing.assert_allclose(oof, saved, atol=1e-6)
    serve_the_trained_run(out, csv, val, probs)


def serve_the_trained_run(run, csv, val, probs):
    """The real 270M behind ``infer serve`` (HTTP on a loopback port): the probabilities of the fold adapter, and the
    decoded set from the run's decode section."""
    import time

    import httpx

    from infer.serve.app import create_app, serve_in_thread
    from infer.serve.settings import Settings

    df = pd.read_csv(csv).iloc[val[:3]]
    rows = [{"assessment": float(r.assessment), "tags": None if pd.isna(r.tags) else str(r.tags),
             "text": "" if pd.isna(r.text) else str(r.text)} for r in df.itertuples()]
    app = create_app(settings=Settings(adapters=[str(run)], max_wait_ms=50))
    with serve_in_thread(app) as url:
        t0 = time.perf_counter()
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.perf_counter() - t0 < 300, "the 270M server never got ready"
            time.sleep(0.2)
        r = httpx.post(f"{url}/predict", json={"rows": rows}, timeout=120)
    assert r.status_code == 200, r.text
    got = np.array([[p["probability"] for p in row["probabilities"]] for row in r.json()["rows"]])
    np.testing.assert_allclose(got, probs[:3], atol=1e-4)
    assert all(row["labels"] for row in r.json()["rows"])  # the cascade always ends in the fallback class


def test_the_shipped_config_on_data_without_label_descriptions(tmp_path, caplog):
    """The shipped config starts the head from the label descriptions; a user's data with none (no
    ``data.label_names_csv``) trains all the same, every class's row from its label column's name."""
    csv = write_rows(tmp_path / "train.csv", 40)
    cfg = RunConfig.from_yaml(ROOT / "configs/gemma-3-270m/qlora.yaml", [
        f"data.train_csv={csv}", "data.label_names_csv=null", "data.max_length=64", "train.max_steps=1",
        "train.num_epochs=1", "train.micro_batch_size=8", "train.eval_batch_size=32", "cv.n_folds=2",
        "cv.folds=[0]", f"output_dir={tmp_path / 'run'}"])
    assert cfg.model.head_init == "descriptions" and cfg.data.label_names_csv is None
    with caplog.at_level("INFO", logger="train.head_init"):
        summary = main(cfg)
    assert summary["folds"] == [0]
    assert "score head from the label descriptions: 20 classes (20 from their label name)" in caplog.text
    labels = json.loads((tmp_path / "run" / "label_names.json").read_text())
    assert not any(labels.get("descriptions", {}).values())
