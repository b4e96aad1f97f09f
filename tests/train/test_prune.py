"""python -m train prune: the pruned folder computes what a model built from the kept layers (and channels) computes,
its report, refused inputs, and a python -m train run on it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from trainkit import as_set_args, run_cli, tiny_config_for, tiny_overrides

from core.errors import InputError
from train.prune import prune

LAYERS = 4
TYPES = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


def build_deep(arch: str, tiny_dir, folder):
    """A 4-layer random-init model of ``arch`` with the tokenizer of the session's tiny model."""
    from transformers import AutoModelForCausalLM

    from core.model import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    tok.save_pretrained(folder)
    cfg = tiny_config(arch, tok)
    cfg.num_hidden_layers = LAYERS
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(TYPES)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms, so that every layer really differs
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deep_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return {arch: build_deep(arch, tiny_models[arch], root / arch) for arch in ("gemma2", "mistral", "gemma3")}


def reference(original, report):
    """A model built from the config with the kept layers only, weights copied by hand from ``original``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keep = report["layers"]["kept"]
    cfg = AutoConfig.from_pretrained(original)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    mlp = report.get("mlp")
    if mlp:
        cfg.intermediate_size = mlp["intermediate_after"]
    full = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).state_dict()
    ref = AutoModelForCausalLM.from_config(cfg).float()
    state = {}
    for key in ref.state_dict():
        src = key
        if key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            src = f"model.layers.{keep[int(i)]}.{rest}"
        w = full[src].clone()
        if mlp and ".mlp." in key:
            ch = torch.tensor(mlp["kept_channels"][str(keep[int(i)])])
            w = w[:, ch] if "down_proj" in key else w[ch]
        state[key] = w
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def logits_of(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc).logits
    return out * enc["attention_mask"][..., None]


@pytest.mark.parametrize("arch, mlp_keep", [("gemma2", None), ("mistral", None), ("gemma3", None),
                                            ("gemma3", 0.5), ("mistral", 0.25)])
def test_pruned_model_equals_the_kept_layers(deep_models, small_csv, tmp_path, arch, mlp_keep):
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.model import load_tokenizer

    src = deep_models[arch]
    cfg = tiny_config_for(src, small_csv, tmp_path / "unused")
    out = tmp_path / "pruned"
    report = prune(cfg, small_csv, out, 2, mlp_keep, max_rows=24)
    # The report: scores of every layer, the two most influential kept in order, and the file matches.
    scores = report["layers"]["block_influence"]
    assert len(scores) == LAYERS and all(0 <= s <= 2 for s in scores)
    top = sorted(range(LAYERS), key=lambda i: -scores[i])[:2]
    assert report["layers"]["kept"] == sorted(top) and report["rows"] == 24
    assert json.loads((out / "prune_report.json").read_text())["layers"] == report["layers"]
    pruned_cfg = AutoConfig.from_pretrained(out)
    assert pruned_cfg.num_hidden_layers == 2
    if arch != "mistral":
        assert pruned_cfg.layer_types == [TYPES[i] for i in report["layers"]["kept"]]
    if mlp_keep:
        n = round(128 * mlp_keep)
        assert pruned_cfg.intermediate_size == n == report["mlp"]["intermediate_after"]
        assert all(len(c) == n and c == sorted(c) for c in report["mlp"]["kept_channels"].values())
        assert set(report["mlp"]["kept_channels"]) == {str(i) for i in report["layers"]["kept"]}
    assert (out / "tokenizer.json").is_file()
    # Its forward equals a model built with the kept layers (and channels) only.
    tok = load_tokenizer(str(out))
    texts = ["user assesment: 2.0 Tags: DELIVERY Review: slow delivery", "Review: cheap and good"]
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(pruned, tok, texts), logits_of(reference(src, report), tok, texts),
                               atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused(deep_models, tiny_models, small_csv, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.model import load_tokenizer

    src = deep_models["mistral"]
    cfg = tiny_config_for(src, small_csv, tmp_path / "unused")
    for n, match in [(5, r"--keep-layers 5: the model .* has 4 layers"), (0, "--keep-layers 0")]:
        with pytest.raises(InputError, match=match):
            prune(cfg, small_csv, tmp_path / "o", n)
    with pytest.raises(InputError, match="--mlp-keep"):
        prune(cfg, small_csv, tmp_path / "o", 2, 1.5)
    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError, match="already exists"):
        prune(cfg, small_csv, tmp_path / "exists", 2)
    gpt2 = tmp_path / "gpt2"
    tok = load_tokenizer(str(tiny_models["mistral"]))
    tok.save_pretrained(gpt2)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(gpt2)
    with pytest.raises(InputError, match="GPT2LMHeadModel .*model_type 'gpt2'.* no model.layers"):
        prune(tiny_config_for(gpt2, small_csv, tmp_path / "unused"), small_csv, tmp_path / "o", 1)
    assert not (tmp_path / "o").exists()


def test_python_m_train_on_a_pruned_model(deep_models, small_csv, tmp_path):
    """The command line end to end: prune, then an ordinary (tiny) training run on the pruned folder."""
    raw = tiny_overrides(deep_models["gemma3"], small_csv, tmp_path / "run", train__num_epochs=1)
    data_args = as_set_args({"data": raw["data"]})
    out = tmp_path / "pruned"
    res = run_cli(["prune", "--model", str(deep_models["gemma3"]), "--keep-layers", "3", "--mlp-keep", "0.5",
                   "--data", str(small_csv), "--out", str(out), "--max-rows", "16", *data_args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "prune_report.json").read_text())["layers"]["before"] == LAYERS
    raw["model"]["name_or_path"] = str(out)
    trained = run_cli(as_set_args(raw))
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rows"] == 21 and (tmp_path / "run" / "fold_0" / "last" / "adapter_model.safetensors").is_file()
