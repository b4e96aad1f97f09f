"""The real 4-bit load path on tiny random-init Gemma-2 / Mistral / Gemma-3 checkpoints: quantized layers, pad
tokens, last-token and mean pooling with right padding, LoRA wiring, model-path errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import LoraArgs, ModelArgs, QuantizationArgs, RunConfig
from core.errors import ConfigError, InputError
from core.model import cpu_has_native_bf16, load_classifier, load_tokenizer, predict_probs, resolve_model_path
from train.lora import apply_lora, count_parameters
from train.optim import build_optimizer

CPU = torch.device("cpu")
ARCHS = ["gemma2", "mistral", "gemma3"]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path, num_labels=5, seed=0, **margs):
    """The tiny model loaded on the CPU; fp32 compute unless ``dtype`` says otherwise, so that the padding and batching
    checks below hold to 1e-5 (bf16 moves a padded row's probabilities by ~1e-3)."""
    margs.setdefault("dtype", "float32")
    return load_classifier(str(path), num_labels, ModelArgs(name_or_path=str(path), **margs), QuantizationArgs(),
                           CPU, seed=seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_in_4bit_with_fresh_head(tiny_models, arch):
    import bitsandbytes as bnb

    model, tok, dtype = load(tiny_models[arch], dtype="auto")
    assert dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)  # the CPU default
    assert type(model).__name__.endswith("ForSequenceClassification")
    linear = [m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert linear and all(isinstance(m, bnb.nn.Linear4bit) for m in linear)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linear)
    assert not isinstance(model.score, bnb.nn.Linear4bit)          # the head is not quantized
    assert model.score.out_features == 5
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert model.config.use_cache is False
    expected_attn = "eager" if arch == "gemma2" else "sdpa"         # Gemma-2 soft-capping needs eager
    assert model.config._attn_implementation == expected_attn
    # The head's init is seeded: same seed, same head; another seed, another head.
    again, _, _ = load(tiny_models[arch], dtype="auto")
    other, _, _ = load(tiny_models[arch], seed=1, dtype="auto")
    assert torch.equal(model.score.weight, again.score.weight)
    assert not torch.equal(model.score.weight, other.score.weight)


def test_mistral_tokenizer_without_pad_gets_one(tiny_models):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_models["mistral"])
    assert raw.pad_token is None                                    # like the real Mistral tokenizer
    tok = load_tokenizer(str(tiny_models["mistral"]))
    assert tok.pad_token == "<unk>" and tok.pad_token_id == tok.unk_token_id
    assert tok.padding_side == "right"
    model, tok2, _ = load(tiny_models["mistral"])
    assert model.config.pad_token_id == tok2.pad_token_id == tok.pad_token_id
    # Gemma-style tokenizers keep their own pad token.
    gtok = load_tokenizer(str(tiny_models["gemma3"]))
    assert gtok.pad_token == "<pad>" and gtok.pad_token_id == 0 and gtok.padding_side == "right"


def test_tokenizer_adds_bos_and_covers_the_sample_data(tiny_models):
    tok = load_tokenizer(str(tiny_models["gemma3"]))
    ids = tok("user assesment: 2.0\n\nTags: DELIVERY\n\nReview: Привезли очень быстро")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("with_lora, pooling", [(False, "last"), (True, "last"), (True, "mean")])
def test_pooling_ignores_right_padding(tiny_models, arch, with_lora, pooling):
    model, tok, dtype = load(tiny_models[arch], pooling=pooling)
    if with_lora:
        model = apply_lora(model, LoraArgs(target_modules=ALL_MODULES, dropout=0.1), grad_checkpointing=False)
        # Make the adapters non-trivial (lora_B starts at zero).
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    model.train()   # predict_probs must switch to eval (no LoRA dropout) and back
    short = tok("курьер опоздал на час")["input_ids"]
    long = tok("user assesment: 3.0\n\nTags: DELIVERY,PRICE\n\nReview: Долго везли заказ, цены выше чем в "
               "магазине, всё очень дорого, курьер опоздал на час")["input_ids"]
    assert len(long) > 2 * len(short)
    alone = predict_probs(model, [short], tok.pad_token_id, 8, dtype, progress=False)
    batched = predict_probs(model, [short, long], tok.pad_token_id, 8, dtype, progress=False)
    long_alone = predict_probs(model, [long], tok.pad_token_id, 8, dtype, progress=False)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(batched[1], long_alone[0], atol=1e-5)
    assert not np.allclose(alone[0], long_alone[0], atol=1e-4)     # the rows really differ
    assert model.training                                           # mode restored
    # Batch size and order do not change a row's probabilities.
    rows = [short, long, short[:3], long[:20]]
    a = predict_probs(model, rows, tok.pad_token_id, 4, dtype, progress=False)
    b = predict_probs(model, rows, tok.pad_token_id, 1, dtype, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.shape == (4, 5) and ((a > 0) & (a < 1)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_mean_pooling_feeds_the_head_the_mean_hidden_state(tiny_models, arch):
    """model.pooling=mean: each row's logits are the head applied to the mean of its final hidden states (the final
    norm's output over the row's tokens, no pad), unlike the last token's."""
    from core.data import collate

    last, tok, _ = load(tiny_models[arch])
    mean, _, _ = load(tiny_models[arch], pooling="mean")
    assert torch.equal(last.score.weight, mean.score.weight)  # same seed, same head: only the pooling differs
    rows = [tok("курьер опоздал на час")["input_ids"], tok("Долго везли заказ, цены выше чем в магазине")["input_ids"]]
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        got = mean(**batch).logits
        states = last.model(**batch).last_hidden_state            # the final norm's output, every position
        mask = batch["attention_mask"].unsqueeze(-1).float()
        want = last.score((states * mask).sum(1) / mask.sum(1))
        last_token = last(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - last_token).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="model.pooling must be"):
        load(tiny_models[arch], pooling="max")


def test_apply_lora_trains_only_adapters_and_head(tiny_model):
    model, _, _ = load(tiny_model)
    model = apply_lora(model, LoraArgs(r=4, target_modules=["q_proj", "v_proj"], layers_from=1), False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    lora = [n for n in trainable if "lora_" in n]
    head = [n for n in trainable if "score" in n]
    assert head and set(lora) | set(head) == set(trainable)
    assert all(".layers.1." in n for n in lora), lora               # layers_from=1: layer 0 untouched
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"}
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in trainable.values()) < counts["total"]


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_optimizer_groups_lora_plus_and_head(tiny_model, ratio):
    """train.lora_plus_ratio: B matrices at lr * ratio, A at lr, the head at head_lr; every trainable tensor once."""
    model = apply_lora(load(tiny_model)[0], LoraArgs(r=4, target_modules=["q_proj", "v_proj"]), False)
    cfg = RunConfig.from_dict({"train": {"lr": 1e-4, "head_lr": 1e-3, "lora_plus_ratio": ratio}})
    groups = build_optimizer(model, cfg, CPU).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(lr_of)
    assert set(lr_of) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, lr in lr_of.items():
        want = 1e-3 if "score" in n else 1e-4 * (ratio if ratio and "lora_B" in n else 1)
        assert lr == pytest.approx(want), n
    assert len(groups) == (2 if ratio is None else 3)   # unchanged layout (and checkpoints) without LoRA+


@pytest.mark.parametrize("largs, match", [
    (LoraArgs(target_modules=["q_proj", "qkv_proj"]), "qkv_proj"),
    (LoraArgs(layers_from=2), "lora.layers_from=2"),
    (LoraArgs(layers_to_transform=[0, 5]), r"layers_to_transform \[5\]"),
])
def test_apply_lora_errors_name_the_key(tiny_model, largs, match):
    model, _, _ = load(tiny_model)
    with pytest.raises(InputError, match=match):
        apply_lora(model, largs, False)


def test_resolve_model_path(tiny_model, tmp_path):
    assert resolve_model_path(ModelArgs(name_or_path=str(tiny_model))) == str(tiny_model)
    with pytest.raises(InputError, match="does not exist.*no/such/model"):
        resolve_model_path(ModelArgs(name_or_path=str(tmp_path / "no/such/model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="without config.json"):
        resolve_model_path(ModelArgs(name_or_path=str(tmp_path / "empty")))
    with pytest.raises(InputError, match="not-a-user/not-a-model.*Hugging Face cache"):
        resolve_model_path(ModelArgs(name_or_path="not-a-user/not-a-model"))
    with pytest.raises(InputError, match="gguf_file not found.*missing.gguf"):
        resolve_model_path(ModelArgs(name_or_path=str(tmp_path), gguf_file="missing.gguf"))


def test_evaluation_leaves_the_4bit_weights_and_gradients_alone(tiny_model):
    """bitsandbytes repacks 4-bit weights in place at the first eval forward on AVX512-BF16 CPUs (bf16 scales, a
    kernel without autograd); load_classifier keeps the training layout, so evaluating mid-training changes nothing."""
    from core.data import collate

    def grads(model, tok, evaluate_first):
        rows = [tok("курьер опоздал на час")["input_ids"], tok("всё очень дорого")["input_ids"]]
        if evaluate_first:
            predict_probs(model, rows, tok.pad_token_id, 8, torch.float32, progress=False)
        model.train()
        batch = collate(rows, tok.pad_token_id)
        model(**batch).logits.sum().backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    largs = LoraArgs(target_modules=ALL_MODULES, dropout=0.0)
    model, tok, _ = load(tiny_model)
    model = apply_lora(model, largs, False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    data_before, absmax_before = q.weight.data.clone(), q.weight.quant_state.absmax.clone()
    plain = grads(model, tok, evaluate_first=False)
    after_eval = grads(model, tok, evaluate_first=True)
    assert torch.equal(q.weight.data, data_before) and torch.equal(q.weight.quant_state.absmax, absmax_before)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert plain.keys() == after_eval.keys()
    layer0 = [n for n in plain if ".layers.0." in n and "lora_A" in n]
    assert layer0 and all(plain[n].abs().max() > 0 for n in layer0)   # gradient reaches the lowest layer
    for n in plain:
        assert torch.allclose(plain[n], after_eval[n], atol=1e-6), n


def test_the_split_reserves_activation_headroom_on_every_gpu(monkeypatch):
    """train.parallel=split: transformers' placement gets train.split_gpu_memory_gib of each GPU for weights."""
    import torch

    from core.config import RunConfig
    from core.model import split_max_memory
    from train.dist import DistEnv, device_map_for

    assert split_max_memory(12.0, 2) == {0: "12GiB", 1: "12GiB", "cpu": "0GiB"}
    cfg = RunConfig.from_dict({"train": {"parallel": "split", "split_gpu_memory_gib": 11.5}})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_map_for(cfg, DistEnv()) == ("auto", {0: "11.5GiB", 1: "11.5GiB", "cpu": "0GiB"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert device_map_for(cfg, DistEnv()) == ({"": torch.device("cpu")}, None)
