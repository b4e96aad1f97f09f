"""Domain-adaptive pretraining (``python -m train dapt``) on tiny random-init models: the chunked next-token loss
equals the model's own, the corpus loss goes down, the adapter starts classification training
(``lora.init_adapter``), a killed run resumes to the same adapter, and bad inputs exit 2 writing nothing."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from trainkit import ROOT, Killed, as_set_args, kill_at, kill_at_launcher, run_cli, tiny_overrides

import train.__main__ as cli
from core.config import LoraArgs, ModelArgs, QuantizationArgs, RunConfig
from core.data import collate, tokenize
from core.errors import ConfigError, InputError
from core.model import load_causal_lm, load_classifier, pick_dtype
from train import dapt
from train.lora import _lora_suffix, apply_lora
from train.loss import lm_loss_sum

CPU = torch.device("cpu")
SAMPLE_TEST = ROOT / "data" / "sample_test.csv"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dapt_raw(model, out, **extra) -> dict:
    """A tiny DAPT config (data.train_csv is unused by DAPT but must be valid for the classifier later)."""
    return tiny_overrides(model, ROOT / "data" / "sample_train.csv", out, **{
        "train__lr": 1e-2, "train__num_epochs": 1, "train__micro_batch_size": 8, "train__warmup_ratio": 0.0,
        **extra})


@pytest.fixture(scope="module")
def dapt_run(tiny_model, small_csv, tmp_path_factory):
    """A finished 20-step DAPT run on sample_test.csv + the first 60 train rows (labels ignored)."""
    out = tmp_path_factory.mktemp("dapt") / "adapter"
    cfg = RunConfig.from_dict(dapt_raw(tiny_model, out, train__num_epochs=3, train__max_steps=20))
    info = dapt.main(cfg, [str(SAMPLE_TEST), str(small_csv)], out, eval_rows=16)
    return out, info, cfg


# ---------------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])  # Gemma-2: final logit soft-capping; Mistral: pad = unk
def test_loss_equals_the_models_own_with_pad_labels_masked(tiny_models, arch):
    path = str(tiny_models[arch])
    # fp32 compute: the chunked loss and its gradient match the model's own to 1e-5 (bf16 would round both).
    model, tok, dtype = load_causal_lm(path, ModelArgs(name_or_path=path, dtype="float32"), QuantizationArgs(), CPU)
    model = apply_lora(model, LoraArgs(r=4, alpha=8, dropout=0.0, target_modules=MODULES), False, task="causal_lm")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    if arch == "gemma2":  # the tiny model's logits are far below the cap of 30: make the soft-capping bite
        assert model.config.final_logit_softcapping == 30.0
        model.config.final_logit_softcapping = 0.05
    texts = pd.read_csv(SAMPLE_TEST)["text"].head(6).tolist()
    batch = collate(tokenize(texts, tok, 64), tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()                      # right padding present
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    lora = [p for p in model.parameters() if p.requires_grad]
    ref.backward()
    ref_grads = [p.grad.clone() for p in lora]
    assert all(g.abs().max() > 0 for g in ref_grads)
    model.zero_grad()

    for chunk in (None, 7 * model.get_output_embeddings().weight.shape[0]):  # one chunk; 7-token chunks
        loss_sum, n = lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], dtype,
                                       chunk_elements=chunk)
        assert n == int(batch["attention_mask"][:, 1:].sum())
        torch.testing.assert_close(loss_sum / n, ref, atol=1e-5, rtol=1e-5)
        (loss_sum / n).backward()                       # the gradient is computed chunk by chunk, in the forward
        for p, g in zip(lora, ref_grads):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
        model.zero_grad()
    with torch.no_grad():                               # evaluation: the same loss, no gradient work
        loss_sum, n = lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], dtype)
    torch.testing.assert_close(loss_sum / n, ref.detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ training


def test_dapt_lowers_the_corpus_loss_and_writes_an_adapter(dapt_run):
    out, info, cfg = dapt_run
    assert info["steps"] == 20 and len(info["loss_history"]) == 20
    assert [f["rows"] for f in info["corpus"]] == [100, 60]
    assert info["rows"] == 160 - 16 and info["eval_rows"] == 16
    assert info["eval_loss_end"] < info["eval_loss_start"] - 0.3, info       # held-out rows, high lr
    assert info["mean_loss_last_10pct"] < info["first_loss"] - 0.3, info
    assert np.isfinite(info["loss_history"]).all() and info["seconds_per_step"] > 0
    assert info["versions"]["peft"] and info["kind"] == "dapt"
    # The folder is the finished adapter only: no checkpoint, no half-written temporaries beside it.
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run_config.yaml",
            "dapt_info.json"} <= names
    assert "checkpoint" not in names and dapt.RUN_FILE not in names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert RunConfig.from_yaml(out / "run_config.yaml") == cfg
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(_lora_suffix(k) for k in weights)
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)   # trained (lora_B starts at 0)
    assert {k.split(".layers.")[1].split(".")[0] for k in weights} == {"0", "1"}


def classifier_config(model, out, init_adapter, **extra):
    return RunConfig.from_dict(tiny_overrides(model, ROOT / "data" / "sample_train.csv", out,
                                              lora__init_adapter=str(init_adapter), **extra))


def test_adapter_starts_the_classifier(dapt_run, tiny_model, small_csv, tmp_path):
    out, _, _ = dapt_run
    cfg = classifier_config(tiny_model, tmp_path / "run", out)
    saved = {_lora_suffix(k): w for k, w in load_file(out / "adapter_model.safetensors").items()}

    def classifier(lora_args):
        base, _, _ = load_classifier(str(tiny_model), 20, cfg.model, cfg.quantization, CPU, seed=7)
        return apply_lora(base, lora_args, False)

    model = classifier(cfg.lora)
    plain = classifier(LoraArgs(**{**cfg.lora.__dict__, "init_adapter": None}))
    lora = {_lora_suffix(n): p for n, p in model.named_parameters() if _lora_suffix(n)}
    assert lora.keys() == saved.keys()
    for k, p in lora.items():
        assert torch.equal(p.detach(), saved[k]), k
    # Everything else is as without init_adapter: the same fresh score head, a trainable fp32 LoRA.
    heads = [(n, p) for n, p in model.named_parameters() if "score" in n and p.requires_grad]
    plain_params = dict(plain.named_parameters())
    assert heads and all(torch.equal(p, plain_params[n]) for n, p in heads)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())

    # End to end: a short cross-validated run from the DAPT adapter.
    run_cfg = classifier_config(tiny_model, tmp_path / "cv", out, data__train_csv=str(small_csv),
                                train__num_epochs=1, train__max_steps=2)
    from train.run import main as run_main

    summary = run_main(run_cfg)
    assert summary["folds"] == [0] and np.isfinite(summary["oof_metrics"]["cascade/exact_match"])
    again = RunConfig.from_yaml(tmp_path / "cv" / "fold_0" / "last" / "run_config.yaml")
    assert again.lora.init_adapter == str(out)


@pytest.mark.parametrize("change, error, match", [
    ({"r": 8}, ConfigError, r"lora\.r is 8, the adapter has 4"),
    ({"alpha": 16}, ConfigError, r"lora\.alpha is 16, the adapter has 8"),
    ({"target_modules": ["q_proj", "v_proj"]}, ConfigError, r"lora\.target_modules"),
    ({"layers_from": 1}, ConfigError, r"LoRA layers differ.*lacks \[\] .*has extra \['layers\.0\."),
    ({"init_adapter": "no/such/adapter"}, InputError, r"lora\.init_adapter=no/such/adapter: folder not found"),
])
def test_init_adapter_mismatch_names_the_key(dapt_run, tiny_model, change, error, match):
    out, _, cfg = dapt_run
    largs = LoraArgs(**{**cfg.lora.__dict__, "init_adapter": str(out), **change})
    base, _, _ = load_classifier(str(tiny_model), 20, cfg.model, cfg.quantization, CPU)
    with pytest.raises(error, match=match) as e:
        apply_lora(base, largs, False)
    assert "lora.init_adapter" in str(e.value)


def test_unfinished_adapter_and_cli_errors(dapt_run, tiny_model, tmp_path, capsys):
    half = tmp_path / "half"                       # a DAPT run that has only checkpointed so far
    (half / "checkpoint").mkdir(parents=True)
    base, _, _ = load_classifier(str(tiny_model), 20, ModelArgs(name_or_path=str(tiny_model)), QuantizationArgs(), CPU)
    with pytest.raises(InputError, match="no finished LoRA adapter"):
        apply_lora(base, LoraArgs(r=4, alpha=8, target_modules=MODULES, init_adapter=str(half)), False)
    # python -m train: exit 2, the key named, no output folder left behind.
    run_dir = tmp_path / "cv"
    args = as_set_args(tiny_overrides(tiny_model, ROOT / "data" / "sample_train.csv", run_dir,
                                      lora__init_adapter=str(tmp_path / "nope")))
    assert cli.main(args) == 2
    assert "lora.init_adapter" in capsys.readouterr().err and not run_dir.exists()


# -------------------------------------------------------------------------------------------------------- resume


def test_resume_after_kill_matches_uninterrupted(tiny_model, small_csv, tmp_path, capsys):
    # 100 + 60 rows, micro-batch 16, accumulation 2 -> 5 steps per epoch, 2 epochs; a checkpoint every 3 steps and
    # at the end of epoch 1 (step 5); killed at the first checkpoint at step >= 6: step 6, in epoch 2.
    raw = dapt_raw(tiny_model, tmp_path / "x", train__num_epochs=2, train__micro_batch_size=16,
                   train__grad_accum_steps=2, train__save_every_steps=3, train__warmup_ratio=0.2, lora__dropout=0.1,
                   train__lr=5e-3)
    corpus = f"{SAMPLE_TEST},{small_csv}"
    ref = tmp_path / "uninterrupted"
    dapt.main(RunConfig.from_dict({**raw, "output_dir": str(ref)}), [str(SAMPLE_TEST), str(small_csv)], ref)

    out = tmp_path / "killed"
    args = ["dapt", *as_set_args(raw), "--corpus", corpus, "--out", str(out)]
    killed = run_cli(args, launcher=kill_at_launcher(6))
    assert killed.returncode == 137, killed.stderr[-3000:]
    state = json.loads((out / dapt.CHECKPOINT / "state.json").read_text())["progress"]
    assert (state["epoch"], state["step"]) == (1, 6)
    assert not (out / "adapter_config.json").exists()

    # Refused without --resume, or with a changed config; continued with --resume.
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*args, "--resume", "--set", "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume: these settings change what the run computes: train.lr 0.005 -> 0.001" in err
    assert cli.main([*args, "--resume"]) == 0
    assert "resumed at epoch 1 step 6/10" in capsys.readouterr().out

    a, b = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())
    ia, ib = (json.loads((d / dapt.INFO_FILE).read_text()) for d in (out, ref))
    assert ia["steps"] == ib["steps"] == 10
    np.testing.assert_allclose(ia["loss_history"], ib["loss_history"], atol=1e-5)
    # A finished run: --resume has nothing to do.
    assert cli.main([*args, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_resumed_run_keeps_the_dtype_it_started_with(tiny_model, small_csv, tmp_path):
    """``model.dtype: auto`` resolves when the run starts (``dapt_run.json`` records it); a resumed run computes in
    that dtype, also where the hardware would now pick another (here: the record edited to the other one)."""
    out = tmp_path / "adapter"
    cfg = RunConfig.from_dict(dapt_raw(tiny_model, out, train__max_steps=4, train__save_every_steps=2))
    corpus = [str(SAMPLE_TEST), str(small_csv)]
    with pytest.raises(Killed):
        dapt.main(cfg, corpus, out, callbacks=kill_at(2))
    started = json.loads((out / dapt.RUN_FILE).read_text())
    now = str(pick_dtype(cfg.model, CPU)).removeprefix("torch.")
    assert started["dtype"] == now
    other = "float32" if now == "bfloat16" else "bfloat16"
    (out / dapt.RUN_FILE).write_text(json.dumps({**started, "dtype": other}))
    assert dapt.main(cfg, corpus, out, resume=True)["dtype"] == other


# ---------------------------------------------------------------------------------------------------- bad inputs


def corpus_variant(tmp_path, kind):
    p = tmp_path / f"{kind}.csv"
    df = pd.read_csv(SAMPLE_TEST).head(20)
    if kind == "missing_file":
        return tmp_path / "no_such_corpus.csv", r"no_such_corpus\.csv: corpus file not found"
    if kind == "header_only":
        df.head(0).to_csv(p, index=False)
        return p, r"header_only\.csv: the corpus file is empty \(no rows\)"
    if kind == "no_text":
        df.assign(assessment=np.nan, tags="", text=np.nan).to_csv(p, index=False)
        return p, r"no_text\.csv: the corpus file has no text"
    if kind == "missing_column":
        df.rename(columns={"text": "review"}).to_csv(p, index=False)
        return p, r"missing_column\.csv: missing column\(s\) \['text'\] used by data\.text_template"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing_file", "header_only", "no_text", "missing_column"])
def test_bad_corpus_exits_2_and_writes_nothing(tiny_model, tmp_path, capsys, kind):
    path, match = corpus_variant(tmp_path, kind)
    out = tmp_path / "out"
    # The bad file second: every file is checked.
    rc = cli.main(["dapt", "--corpus", f"{SAMPLE_TEST},{path}", "--out", str(out),
                   "--set", f"model.name_or_path={tiny_model}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ")
    assert re.search(match, err), err
    assert not out.exists()


@pytest.mark.parametrize("extra, match", [
    (["--set", "lora.init_adapter=adapters/x"], "lora.init_adapter is for classification training"),
    (["--set", "train.lrr=1"], "unknown config key.*train.lrr"),
    (["--eval-rows", "100"], "--eval-rows 100 leaves no training rows"),
    (["--set", "lora.target_modules=[nope_proj]"], r"lora.target_modules \['nope_proj'\] not found"),
])
def test_bad_settings_exit_2_and_write_nothing(tiny_model, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    rc = cli.main(["dapt", "--corpus", str(SAMPLE_TEST), "--out", str(out),
                   "--set", f"model.name_or_path={tiny_model}", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert not out.exists()


def test_finished_output_needs_resume(dapt_run, tiny_model, capsys):
    out, _, _ = dapt_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = ["--corpus", str(SAMPLE_TEST), "--out", str(out), "--set", f"model.name_or_path={tiny_model}"]
    assert cli.main(["dapt", *args]) == 2
    assert "already holds a finished DAPT adapter; pass --resume" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_shipped_dapt_config_fits_the_classification_config():
    """The documented pair of commands works: the DAPT adapter's lora section is the classifier's."""
    d = RunConfig.from_yaml(ROOT / "configs/gemma-3-270m/dapt.yaml")
    c = RunConfig.from_yaml(ROOT / "configs/gemma-3-270m/qlora.yaml")
    assert (d.lora.r, d.lora.alpha, d.lora.target_modules, d.lora.layers_from, d.lora.layers_to_transform,
            d.lora.use_dora) == (c.lora.r, c.lora.alpha, c.lora.target_modules, c.lora.layers_from,
                                 c.lora.layers_to_transform, c.lora.use_dora)
    # The same base model; the head's start (model.head_init) is the classifier's alone: DAPT trains no score head.
    assert dataclasses.replace(d.model, head_init=c.model.head_init) == c.model and d.model.head_init == "random"
    assert d.quantization == c.quantization and d.lora.init_adapter is None
    assert d.data.text_template == c.data.text_template


def test_out_holding_something_else_is_never_replaced(tiny_model, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    base = ["--corpus", str(SAMPLE_TEST), "--out", str(out), "--set", f"model.name_or_path={tiny_model}"]
    assert cli.main(["dapt", *base, "--resume"]) == 2
    assert "holds no DAPT run to resume" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert cli.main(["dapt", *base[2:]]) == 2                         # no --corpus
    assert "no corpus CSV given (--corpus" in capsys.readouterr().err
