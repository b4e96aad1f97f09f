"""End-to-end cross-validated training on tiny 4-bit models: artifacts, learning, and reload reproducing the saved
probabilities, for each architecture; odd-but-valid inputs; re-use of an output folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainkit import tiny_config_for, write_rows

from core.data import read_csv, tokenize
from core.errors import InputError
from core.io import read_probs
from core.model import load_classifier, load_tokenizer, predict_probs
from train.lora import apply_lora
from train.run import main

ARCHS = ["gemma2", "mistral", "gemma3"]
LABELS = [f"trend_id_res{i}" for i in range(20)]


def bce(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def reload_probs(adapter_dir, cfg, texts) -> np.ndarray:
    """What infer does: base model in 4-bit + the adapter folder (LoRA + score head), tokenizer from the folder."""
    from peft import PeftModel

    base, _, dtype = load_classifier(cfg.model.name_or_path, len(LABELS), cfg.model, cfg.quantization,
                                     torch.device("cpu"), seed=12345)   # another head init: must be overwritten
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    tok = load_tokenizer(str(adapter_dir))
    ids = tokenize(texts, tok, cfg.data.max_length)
    return predict_probs(model, ids, tok.pad_token_id, 7, dtype, progress=False)


@pytest.fixture(scope="module")
def runs(tiny_models, small_csv, tmp_path_factory):
    """One 2-epoch run of fold 0 (of 3) per architecture; gemma2 keeps the best epoch, the others the last."""
    out = {}
    for arch in ARCHS:
        cfg = tiny_config_for(tiny_models[arch], small_csv, tmp_path_factory.mktemp(arch) / "run",
                              train__keep="best" if arch == "gemma2" else "last")
        summary = main(cfg)
        out[arch] = (cfg, summary)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_run_writes_complete_artifacts(runs, arch):
    cfg, summary = runs[arch]
    run = Path(cfg.output_dir)
    fold = run / "fold_0"
    for name in ("summary.json", "oof.csv", "oof.csv.meta.json", "folds.csv", "label_names.json",
                 "run_config.yaml"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["folds"] == [0]
    for k in ("t0.5/exact_match", "t0.5/micro_f1", "cascade/exact_match", "cascade/micro_f1", "cascade/macro_f1"):
        assert 0.0 <= summary["oof_metrics"][k] <= 1.0
        assert 0.0 <= summary["mean_fold_metrics"][k] <= 1.0
    assert summary["label_names"] == LABELS
    # keep: best chose the epoch on the OOF rows: the summary and the OOF file say they are optimistic
    oof_meta = json.loads((run / "oof.csv.meta.json").read_text())
    if cfg.train.keep == "best":
        assert "optimistic" in summary["optimistic"] and summary["optimistic"] == oof_meta["optimistic"]
    else:
        assert "optimistic" not in summary and "optimistic" not in oof_meta
    assert yaml.safe_load((run / "run_config.yaml").read_text()) == cfg.to_dict()

    # Folds: 60 rows in 3 folds; the OOF file holds exactly fold 0's rows, in data order, with every class column.
    folds = pd.read_csv(run / "folds.csv")
    data = pd.read_csv(cfg.data.train_csv)
    assert folds["index"].tolist() == data["index"].tolist()
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    val_ids = folds.loc[folds["fold"] == 0, "index"].to_numpy()
    ids, probs, cols = read_probs(run / "oof.csv", LABELS)
    assert cols == LABELS and list(ids) == list(val_ids) and probs.shape == (len(val_ids), 20)
    assert summary["rows"] == len(val_ids)
    n_train = len(data) - len(val_ids)
    assert summary["throughput"]["train_samples"] == 2 * n_train and summary["throughput"]["samples_per_s"] > 0
    assert 0 <= summary["throughput"]["padding_fraction"] < 1

    # Per-fold metrics: one history row per epoch, an optimizer step per micro-batch of 8 training rows.
    metrics = json.loads((fold / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["steps"] == 2 * math.ceil(n_train / 8)
    assert metrics["best"]["cascade/exact_match"] == max(h["cascade/exact_match"] for h in metrics["history"])

    # Adapter folders: LoRA + the trained score head (modules_to_save), tokenizer, config, labels, card.
    for which in ("last", "best"):
        folder = fold / which
        weights = load_file(folder / "adapter_model.safetensors")
        assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
        head = [k for k in weights if "score" in k]
        assert head and weights[head[0]].shape == (20, 64), head
        acfg = json.loads((folder / "adapter_config.json").read_text())
        assert "score" in acfg["modules_to_save"] and acfg["task_type"] == "SEQ_CLS"
        info = json.loads((folder / "adapter_info.json").read_text())
        assert info["num_labels"] == 20 and info["fold"] == 0 and "cascade/exact_match" in info["metrics"]
        assert json.loads((folder / "label_names.json").read_text())["label_names"] == LABELS
        assert yaml.safe_load((folder / "run_config.yaml").read_text()) == cfg.to_dict()
        assert (folder / "README.md").read_text().startswith("---")
        assert load_tokenizer(str(folder)).pad_token is not None
    last_info = json.loads((fold / "last" / "adapter_info.json").read_text())
    assert last_info["epoch"] == 2
    # The OOF file is the kept adapter's validation probabilities.
    kept = np.load(fold / f"val_probs_{cfg.train.keep}.npy")
    np.testing.assert_allclose(probs, kept, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_learns_and_reload_reproduces_probabilities(runs, arch):
    cfg, _ = runs[arch]
    run = Path(cfg.output_dir)
    ds = read_csv(cfg.data.train_csv, cfg.data)
    fold_of_row = pd.read_csv(run / "folds.csv")["fold"].to_numpy()
    val = np.flatnonzero(fold_of_row == 0)
    texts = [ds.texts[i] for i in val]
    y = ds.labels[val]

    # Untrained: the same seeded head + fresh LoRA (lora_B = 0) as the run's start.
    base, tok, dtype = load_classifier(cfg.model.name_or_path, 20, cfg.model, cfg.quantization,
                                       torch.device("cpu"), seed=cfg.train.seed + 0)
    init_model = apply_lora(base, cfg.lora, False)
    init = predict_probs(init_model, tokenize(texts, tok, cfg.data.max_length), tok.pad_token_id, 16, dtype,
                         progress=False)
    saved_last = np.load(run / "fold_0" / "val_probs_last.npy")
    assert np.abs(saved_last - init).max() > 0.05, "probabilities did not move"
    assert bce(saved_last, y) < bce(init, y) - 0.05, (bce(saved_last, y), bce(init, y))

    # Reload each adapter folder on a fresh 4-bit base: the same probabilities as saved during training.
    for which in ("last", "best"):
        again = reload_probs(run / "fold_0" / which, cfg, texts)
        np.testing.assert_allclose(again, np.load(run / "fold_0" / f"val_probs_{which}.npy"), atol=1e-5)


def test_used_output_dir_needs_resume(runs, capsys):
    from core.cli import setup_logging

    setup_logging()  # the run's messages on stdout, as the command line has them
    cfg, summary = runs["gemma3"]
    with pytest.raises(InputError, match=f"{cfg.output_dir}.*already holds a run.*--resume"):
        main(cfg)
    # --resume on a finished run: nothing is retrained, the same summary comes back.
    before = (Path(cfg.output_dir) / "fold_0" / "last" / "adapter_model.safetensors")
    mtime = before.stat().st_mtime_ns
    again = main(cfg, resume=True)
    assert "fold 0: already done, skipped" in capsys.readouterr().out
    assert again["oof_metrics"] == summary["oof_metrics"]
    assert before.stat().st_mtime_ns == mtime


def test_resume_with_other_labels_is_refused(runs, tmp_path):
    cfg, _ = runs["gemma3"]
    fewer = tmp_path / "fewer.csv"
    pd.read_csv(cfg.data.train_csv).drop(columns=["trend_id_res19"]).to_csv(fewer, index=False)
    other = tiny_config_for(cfg.model.name_or_path, fewer, cfg.output_dir, decode__fallback="argmax")
    with pytest.raises(InputError, match="label_names.json.*20 labels.*19"):
        main(other, resume=True)


def test_all_folds_cover_every_row(tiny_model, small_csv, tmp_path):
    cfg = tiny_config_for(tiny_model, small_csv, tmp_path / "run", cv__folds=None, train__num_epochs=1)
    summary = main(cfg)
    assert summary["folds"] == [0, 1, 2] and summary["rows"] == 60
    ids, probs, _ = read_probs(tmp_path / "run" / "oof.csv", LABELS)
    assert list(ids) == pd.read_csv(small_csv)["index"].tolist()
    for k in range(3):
        fold_probs = np.load(tmp_path / "run" / f"fold_{k}" / "val_probs_last.npy")
        rows = pd.read_csv(tmp_path / "run" / "folds.csv")["fold"].to_numpy() == k
        np.testing.assert_allclose(probs[rows], fold_probs, atol=1e-6)
    assert len(summary["per_fold"]) == 3


def test_token_budget_splits_micro_batches_without_changing_the_training(tiny_model, small_csv, tmp_path):
    """train.max_tokens_per_micro_batch runs long micro-batches in pieces: the same optimizer steps and gradients
    (up to float summation order), less padding; dropout off so both runs draw no random numbers."""
    runs = {}
    for name, budget in [("whole", None), ("split", 48)]:
        cfg = tiny_config_for(tiny_model, small_csv, tmp_path / name, lora__dropout=0.0,
                              train__max_tokens_per_micro_batch=budget)
        main(cfg)
        fold = tmp_path / name / "fold_0"
        runs[name] = (fold, json.loads((fold / "metrics.json").read_text()))
    (whole, mw), (split, ms) = runs["whole"], runs["split"]
    assert mw["steps"] == ms["steps"] and mw["samples"] == ms["samples"] and mw["real_tokens"] == ms["real_tokens"]
    assert ms["padded_tokens"] < mw["padded_tokens"]
    ww = load_file(whole / "last" / "adapter_model.safetensors")
    ws = load_file(split / "last" / "adapter_model.safetensors")
    moved = 0.0
    for k in ww:
        assert torch.allclose(ww[k], ws[k], atol=1e-4, rtol=1e-3), (k, (ww[k] - ws[k]).abs().max())
        moved = max(moved, (ww[k]).abs().max().item())
    assert moved > 0
    np.testing.assert_allclose(np.load(whole / "val_probs_last.npy"), np.load(split / "val_probs_last.npy"), atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_empty_texts_missing_tags_and_emoji_are_valid(tiny_models, tmp_path, arch):
    n = 30
    texts = pd.read_csv(write_rows(tmp_path / "base.csv", n))["text"].tolist()
    texts[0] = ""                                   # empty text (read back as NaN)
    texts[1] = "😀🔥👍"                              # only emoji (unknown to the tokenizer)
    texts[2] = "Лучший сервис 👍 " * 40             # longer than max_length: truncated
    texts[3] = "   "
    texts[4] = "🎉 курьер опоздал на час"
    path = write_rows(tmp_path / "odd.csv", n, text=texts, tags=[np.nan] * n)
    ds = read_csv(path, tiny_config_for(tiny_models[arch], path, tmp_path).data)
    assert ds.texts[0].endswith("Review: ") and "Tags: \n" in ds.texts[0] and "nan" not in ds.texts[0]
    cfg = tiny_config_for(tiny_models[arch], path, tmp_path / "run", train__num_epochs=1,
                          data__text_template="{text}")   # an empty text is then just <bos>
    summary = main(cfg)
    folds = pd.read_csv(tmp_path / "run" / "folds.csv")
    assert summary["rows"] == (folds["fold"] == 0).sum() >= 9
    ids, probs, _ = read_probs(tmp_path / "run" / "oof.csv", LABELS)
    assert np.isfinite(probs).all() and list(ids) == folds.loc[folds["fold"] == 0, "index"].tolist()


def test_checkpoints_are_pushed_when_configured(tiny_model, small_csv, tmp_path, monkeypatch):
    """hub.push_checkpoints_to: checkpoints (here every 2 steps + epoch ends) are pushed after they are saved, on a
    worker thread."""
    import core.hub

    pushed = []

    def fake_push(run_dir, repo, private=True):
        pushed.append((Path(run_dir), repo, private, (Path(run_dir) / "fold_0/checkpoint/state.json").is_file()))
        return True

    monkeypatch.setattr(core.hub, "push_checkpoint", fake_push)
    cfg = tiny_config_for(tiny_model, small_csv, tmp_path / "run", train__save_every_steps=2, train__num_epochs=1,
                          hub__push_checkpoints_to="user/ckpt", hub__private=False)
    main(cfg)
    assert len(pushed) >= 2
    assert all(p == (tmp_path / "run", "user/ckpt", False, True) for p in pushed)


def test_background_push_never_blocks_and_reports_failures(capsys):
    """A slow upload does not stall training; one asked for while it runs is skipped; a failure is reported."""
    import threading
    import time

    from core.cli import setup_logging
    from train.run_dir import BackgroundPush

    setup_logging()
    release, calls = threading.Event(), []

    def slow_push():
        calls.append(time.perf_counter())
        release.wait(10)
        return True

    push = BackgroundPush(slow_push)
    t0 = time.perf_counter()
    assert push() is True and push() is False   # the second one is skipped while the first uploads
    assert time.perf_counter() - t0 < 0.5 and "still running" in capsys.readouterr().out
    release.set()
    push.close()
    assert len(calls) == 1

    def failing_push():
        raise OSError("network down")

    push = BackgroundPush(failing_push)
    push()
    push.close()
    assert "checkpoint push failed (OSError: network down); training goes on" in capsys.readouterr().out
