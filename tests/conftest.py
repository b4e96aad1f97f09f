"""Shared fixtures: a locally built tokenizer, tiny random-init decoder checkpoints, small data and config helpers.

Nothing here touches the network: the tokenizer is trained on the project's sample data and the tiny models are
random-init Gemma-2 / Mistral / Gemma-3 causal LMs saved with ``save_pretrained`` (so that
``AutoModelForSequenceClassification`` adds a fresh ``score`` head on load, exactly as with a real checkpoint).
They are built once per test session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The tests of logic compare probabilities and weights to 1e-5 or so, which bf16 compute does not keep (a padded row's
# probabilities move by ~1e-3 with the batch it is in): they run as on a CPU without native bf16, where
# ``model.dtype: auto`` is fp32 (core.model.cpu_has_native_bf16 honours this oneDNN cap; subprocesses inherit it).
# bf16 itself is tested where it is asked for explicitly: tests/train/test_cpu_bf16.py, tests/core/test_dtype.py,
# tests/core/test_4bit_grads.py.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = ROOT / "data" / "sample_train.csv"
SAMPLE_TEST = ROOT / "data" / "sample_test.csv"
SAMPLE_TRENDS = ROOT / "data" / "sample_trends.csv"

# The sample data is a slice of the DLS data: its columns and prompt live here (and in configs/), not in the code.
SAMPLE_TEMPLATE = "user assesment: {assessment}\n\nTags: {tags}\n\nReview: {text}"
SAMPLE_DATA = {"id_column": "index", "text_template": SAMPLE_TEMPLATE, "label_prefix": "trend_id_res"}
SAMPLE_DECODE = {"fallback": "trend_id_res19"}
SAMPLE_SET_ARGS = ["--set", "data.id_column=index", "--set", f"data.text_template={json.dumps(SAMPLE_TEMPLATE)}",
                   "--set", "data.label_prefix=trend_id_res", "--set", "decode.fallback=trend_id_res19"]

TINY_ARCHS = ("gemma2", "mistral", "gemma3")
TINY_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512}


def sample_prompts() -> list[str]:
    """The sample CSVs' texts formatted with the default template (what the tokenizer must cover)."""
    from core.data import format_prompt

    out = []
    for path in (SAMPLE_TRAIN, SAMPLE_TEST):
        for row in pd.read_csv(path).to_dict("records"):
            out.append(format_prompt(SAMPLE_TEMPLATE, row))
    return out


def build_tokenizer(folder: Path, specials: list[str], pad_token: str | None, bos: str, eos: str, unk: str):
    """A word-level tokenizer (lower-cased, punctuation split) trained on the sample prompts, saved to ``folder``.

    Adds ``bos`` in front of every text, like the Gemma and Mistral tokenizers.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sample_prompts() + [str(d) for d in range(10)],
                            trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.save_pretrained(folder)
    return fast


def tiny_config(arch: str, tokenizer):
    """A tiny random-init config of ``arch`` sized to ``tokenizer``."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if arch == "gemma2":
        return Gemma2Config(**TINY_SIZES, **ids, sliding_window=16, query_pre_attn_scalar=16,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "mistral":
        return MistralConfig(**TINY_SIZES, **ids, sliding_window=None, tie_word_embeddings=False)
    if arch == "gemma3":
        return Gemma3TextConfig(**TINY_SIZES, **ids, sliding_window=16, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(arch)


def build_tiny_model(arch: str, folder: Path) -> Path:
    """Tokenizer + random-init ``*ForCausalLM`` of ``arch`` saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    if arch == "mistral":
        # Like the real Mistral tokenizer: <unk>/<s>/</s> and no pad token (the toolkit must pick one).
        tok = build_tokenizer(folder, ["<unk>", "<s>", "</s>"], None, "<s>", "</s>", "<unk>")
    else:
        # Gemma-style: <pad>=0, <eos>=1, <bos>=2, <unk>=3.
        tok = build_tokenizer(folder, ["<pad>", "<eos>", "<bos>", "<unk>"], "<pad>", "<bos>", "<eos>", "<unk>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tok))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{arch: folder} for the tiny gemma2 / mistral / gemma3 checkpoints (built once per session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    """The default tiny model for tests that need just one (Gemma-3 text architecture)."""
    return tiny_models["gemma3"]


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> Path:
    """The first 60 rows of data/sample_train.csv."""
    path = tmp_path_factory.mktemp("data") / "train60.csv"
    pd.read_csv(SAMPLE_TRAIN).head(60).to_csv(path, index=False)
    return path


def train_tiny_run(root: Path, model_dir: Path, train_csv: Path, folds=(0, 1), quantization: dict | None = None,
                   **model) -> Path:
    """Train ``folds`` of a 2-fold CV for 2 optimizer steps each (``quantization``, ``model``: more settings of those
    sections); returns the run folder."""
    from core.config import RunConfig
    from train.run import main as run_main

    cfg = RunConfig.from_dict({
        # eager attention: with bitsandbytes' CPU 4-bit kernels (bf16 activations) SDPA's padded and unpadded
        # paths differ at bf16 noise level; eager makes batched and one-at-a-time bitwise comparable.
        "model": {"name_or_path": str(model_dir), "attn_implementation": "eager", **model},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "decode": dict(SAMPLE_DECODE),
        "data": {**SAMPLE_DATA, "train_csv": str(train_csv), "label_names_csv": str(SAMPLE_TRENDS),
                 "max_length": 64},
        "train": {"num_epochs": 1, "max_steps": 2, "micro_batch_size": 8, "eval_batch_size": 16,
                  "save_every_steps": 0, "lr": 1e-2, "head_lr": 5e-2},
        "cv": {"n_folds": 2, "folds": list(folds)},
        "quantization": dict(quantization or {}),
        "output_dir": str(root / "run"),
    })
    run_main(cfg)
    return root / "run"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, small_csv) -> Path:
    """A tiny trained run (two folds of a 2-fold CV, 2 steps each), one per module."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny"), tiny_model, small_csv)
