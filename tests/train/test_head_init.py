"""``model.head_init: descriptions`` (train/head_init.py) on tiny random-init 4-bit models: the head's rows are the
centred, scaled pooled states of the label descriptions (recomputed here without the module's code), deterministic,
with the logits' spread of the random head; the texts fall back to label names; the config key; a tiny run with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SAMPLE_TEMPLATE, SAMPLE_TRENDS
from trainkit import tiny_config_for

from core.config import DataArgs, LoraArgs, ModelArgs, QuantizationArgs, RunConfig
from core.data import read_csv, read_label_descriptions, tokenize
from core.errors import ConfigError
from core.model import load_classifier, predict_probs
from train import checkpoint
from train.head_init import description_texts, head_rows, init_score_head
from train.lora import apply_lora
from train.run_dir import LATER_DEFAULTS, run_fingerprint

CPU = torch.device("cpu")
LABELS = [f"trend_id_res{i}" for i in range(20)]
DATA = DataArgs(text_template=SAMPLE_TEMPLATE, max_length=64)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(path, seed=0):
    """The tiny classifier (fp32 compute, 20 labels, head seeded by ``seed``) with LoRA applied, as a fold starts."""
    model, tok, dtype = load_classifier(str(path), len(LABELS), ModelArgs(name_or_path=str(path), dtype="float32"),
                                        QuantizationArgs(), CPU, seed=seed)
    return apply_lora(model, LoraArgs(r=4, alpha=8, target_modules=ALL_MODULES), False), tok, dtype


def head(model) -> torch.Tensor:
    return model.get_base_model().score.modules_to_save["default"].weight


def pooled_one_by_one(model, tok, texts) -> torch.Tensor:
    """The classifier's pooled state, recomputed: each text alone (no padding), the decoder's last hidden state at its
    last token that is not the pad token (Mistral's pad is <unk>, which a text may end with), in eval mode."""
    decoder = model.get_base_model().model
    model.eval()
    out = []
    with torch.no_grad():
        for ids in tokenize(texts, tok, DATA.max_length):
            last = max(i for i, t in enumerate(ids) if t != tok.pad_token_id)
            out.append(decoder(input_ids=torch.tensor([ids])).last_hidden_state[0, last].float())
    model.train()
    return torch.stack(out)


def test_description_texts_use_the_template_and_fall_back_to_names():
    descriptions = {"a": "Долгая доставка", "b": "  ", "c": None}
    texts = description_texts(["a", "b", "c", "d"], descriptions, SAMPLE_TEMPLATE)
    assert texts == [f"user assesment: \n\nTags: \n\nReview: {t}" for t in ("Долгая доставка", "b", "c", "d")]
    assert description_texts(["a", "d"], descriptions, "{text}") == ["Долгая доставка", "d"]
    # Without a {text} field the description is the template's last field, as for the training rows' text.
    assert description_texts(["a"], descriptions, "{title}: {body}") == [": Долгая доставка"]


@pytest.mark.parametrize("arch,adapter", [("gemma3", False), ("mistral", False), ("gemma3", True)])
def test_rows_are_the_centred_scaled_pooled_states_of_the_descriptions(tiny_models, arch, adapter, caplog):
    model, tok, dtype = lora_model(tiny_models[arch])
    if adapter:  # a DAPT adapter (lora.init_adapter): non-zero LoRA B, and the pooled states include it
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    descriptions = read_label_descriptions(SAMPLE_TRENDS, LABELS)
    del descriptions["trend_id_res7"]  # one class without a description: its label name
    texts = description_texts(LABELS, descriptions, DATA.text_template)
    assert texts[7].endswith("Review: trend_id_res7") and texts[0].endswith("Review: Долгая доставка")
    random_rows = head(model).detach().clone()
    states = pooled_one_by_one(model, tok, texts)
    # The recomputed state is what the classifier pools: its logits are the states times the (random) head.
    with torch.no_grad():
        model.eval()
        logits = torch.stack([model(input_ids=torch.tensor([ids])).logits[0]
                              for ids in tokenize(texts, tok, DATA.max_length)])
        model.train()
    torch.testing.assert_close(logits, states @ random_rows.T, atol=1e-4, rtol=1e-4)

    with caplog.at_level("WARNING", logger="train.head_init"):
        info = init_score_head(model, tok, LABELS, descriptions, DATA, dtype, batch_size=7)  # 3 padded batches
    # A names file that misses a class (e.g. the sample's file for data with more labels) is said, with the class.
    assert "1 of 20 classes have no name in data.label_names_csv (trend_id_res7)" in caplog.text
    centred = states - states.mean(dim=0)
    unit = centred / centred.norm(dim=1, keepdim=True)
    random_std = (states @ random_rows.T).std()
    expected = unit * random_std / (states @ unit.T).std()   # the descriptions' logits spread as the random head's
    rows = head(model).detach()
    assert rows.dtype == torch.float32 and head(model).requires_grad
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-4)
    norm = rows.norm(dim=1)
    torch.testing.assert_close(norm, norm.mean().expand(len(LABELS)))   # one norm for every class
    torch.testing.assert_close((states @ rows.T).std(), random_std, atol=1e-5, rtol=1e-4)
    assert model.training                                          # mode restored
    assert info["classes"] == 20 and info["from_names"] == 1 and info["row_norm"] == pytest.approx(float(norm[0]))
    assert info["random_row_norm"] == pytest.approx(float(random_rows.norm(dim=1).mean()))
    assert info["logit_std"] == pytest.approx(float(random_std), rel=1e-4)
    # The original (frozen) head is untouched; only the trainable copy, the one saved with the adapter, changed.
    torch.testing.assert_close(model.get_base_model().score.original_module.weight.float(), random_rows)


def test_deterministic_and_the_seed_only_sets_the_scale(tiny_model):
    descriptions = read_label_descriptions(SAMPLE_TRENDS, LABELS)
    runs = []
    for seed in (0, 0, 5):
        model, tok, dtype = lora_model(tiny_model, seed=seed)
        torch.manual_seed(100 + len(runs))  # another LoRA A init each time: B is zero, so it must not matter
        for n, p in model.named_parameters():
            if "lora_A" in n:
                torch.nn.init.normal_(p.data)
        init_score_head(model, tok, LABELS, descriptions, DATA, dtype, batch_size=8)
        runs.append(head(model).detach().clone())
    assert torch.equal(runs[0], runs[1])
    # Another seed: another random head, so another row norm, but the same directions.
    unit = [r / r.norm(dim=1, keepdim=True) for r in runs]
    torch.testing.assert_close(unit[0], unit[2], atol=1e-5, rtol=1e-5)
    assert not torch.equal(runs[0], runs[2])


def test_initial_logits_have_the_random_heads_spread(tiny_model, small_csv, caplog):
    """On the training rows (not the descriptions), each class's logits spread about as much as the random head's."""
    ds = read_csv(small_csv, DataArgs(text_template=SAMPLE_TEMPLATE, id_column="index", label_prefix="trend_id_res"))
    model, tok, dtype = lora_model(tiny_model)
    ids = tokenize(ds.texts, tok, DATA.max_length)

    def logits():
        p = np.clip(predict_probs(model, ids, tok.pad_token_id, 16, dtype, progress=False), 1e-12, 1 - 1e-12)
        return np.log(p / (1 - p))

    before = logits()
    with caplog.at_level("WARNING", logger="train.head_init"):
        init_score_head(model, tok, LABELS, read_label_descriptions(SAMPLE_TRENDS, LABELS), DATA, dtype, 16)
    assert "no name" not in caplog.text   # every class named: no warning
    after = logits()
    assert not np.allclose(before, after)
    ratio = after.std(axis=0).mean() / before.std(axis=0).mean()   # per-class spread over the rows
    assert 0.5 < ratio < 2, ratio
    scale = np.abs(after).mean() / np.abs(before).mean()           # and the logits' size
    assert 0.5 < scale < 2, scale


def test_rows_need_classes_that_differ():
    with pytest.raises(ConfigError, match="model.head_init"):
        head_rows(torch.ones(1, 8), torch.randn(1, 8))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        head_rows(torch.ones(2, 8), torch.randn(2, 8))
    states = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    rows = head_rows(states, 5 * torch.eye(3, 2))
    torch.testing.assert_close(rows.norm(dim=1), rows.norm(dim=1)[0].expand(3))
    torch.testing.assert_close((states @ rows.T).std(), (states @ (5 * torch.eye(3, 2)).T).std())


def test_config_key_and_resume_fingerprint():
    assert RunConfig.from_dict({}).model.head_init == "random"
    assert RunConfig.from_dict({"model": {"head_init": "descriptions"}}).model.head_init == "descriptions"
    with pytest.raises(ConfigError, match=r"model\.head_init must be one of \['random', 'descriptions'\]"):
        RunConfig.from_dict({"model": {"head_init": "names"}})
    # A checkpoint written before the key existed (its config has no model.head_init) still resumes ...
    default = RunConfig.from_dict({})
    older = default.to_dict()
    del older["model"]["head_init"]
    assert run_fingerprint(default) == checkpoint.fingerprint(checkpoint.result_settings(older, later=LATER_DEFAULTS))
    # ... and the key changes what a run computes.
    assert run_fingerprint(RunConfig.from_dict({"model": {"head_init": "descriptions"}})) != run_fingerprint(default)


def test_a_run_with_description_init_trains_and_its_adapter_predicts(tiny_model, small_csv, tmp_path, monkeypatch):
    import train.run as run_module

    calls = []

    def spy(model, tok, label_names, descriptions, data, dtype, batch_size):
        info = run_module_init(model, tok, label_names, descriptions, data, dtype, batch_size)
        calls.append((list(label_names), dict(descriptions), head(model).detach().clone()))
        return info

    run_module_init = run_module.init_score_head
    monkeypatch.setattr(run_module, "init_score_head", spy)
    cfg = tiny_config_for(tiny_model, small_csv, tmp_path / "run", model__head_init="descriptions",
                          data__label_names_csv=str(SAMPLE_TRENDS), train__num_epochs=1)
    summary = run_module.main(cfg)
    assert len(calls) == 1 and calls[0][0] == LABELS
    assert calls[0][1] == read_label_descriptions(SAMPLE_TRENDS, LABELS) and calls[0][1]
    fold = Path(cfg.output_dir) / "fold_0"
    losses = [row["loss"] for row in json.loads((fold / "metrics.json").read_text())["log_history"]]
    assert losses and all(np.isfinite(losses))
    assert 0 <= summary["oof_metrics"]["cascade/exact_match"] <= 1
    # The saved head started from the description rows (a few steps later it still points near them), not from the
    # random head this fold would have had (seeded train.seed + fold).
    from safetensors.torch import load_file

    saved = [v for k, v in load_file(str(fold / "last" / "adapter_model.safetensors")).items() if "score" in k]
    assert len(saved) == 1
    random_head = load_classifier(str(tiny_model), len(LABELS), cfg.model, cfg.quantization, CPU,
                                  seed=cfg.train.seed)[0].score.weight.detach().float()
    cos_start = torch.nn.functional.cosine_similarity(saved[0].float(), calls[0][2], dim=1).mean()
    cos_random = torch.nn.functional.cosine_similarity(saved[0].float(), random_head, dim=1).mean()
    assert cos_start > 0.4 and abs(cos_random) < 0.2, (cos_start, cos_random)
    # The adapter predicts: reloaded as infer does, it gives the fold's saved validation probabilities.
    from peft import PeftModel

    base, tok, dtype = load_classifier(str(tiny_model), len(LABELS), cfg.model, cfg.quantization, CPU, seed=12345)
    model = PeftModel.from_pretrained(base, str(fold / "last"))
    ds = read_csv(small_csv, cfg.data)
    val = pd.read_csv(Path(cfg.output_dir) / "folds.csv")["fold"].to_numpy() == 0
    probs = predict_probs(model, [t for t, v in zip(tokenize(ds.texts, tok, cfg.data.max_length), val) if v],
                          tok.pad_token_id, 16, dtype, progress=False)
    np.testing.assert_allclose(probs, np.load(fold / "val_probs_last.npy"), atol=1e-5)
