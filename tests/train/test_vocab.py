"""Vocabulary trimming (``python -m train trim-vocab``) on tiny models: the WordLevel tokenizers of conftest.py and
a tiny byte-fallback BPE (Gemma-style) built here, so that the BPE path runs on CPU in CI.

Checks: trimmed ids map back to the original ids, identical classifier logits (same score head) before/after,
save/reload through the toolkit's 4-bit loader, byte fallback for text outside the corpus (and the report counting
it), and clear errors for bad input with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SAMPLE_TEMPLATE, SAMPLE_TEST, SAMPLE_TRAIN, sample_prompts, tiny_config

from core.config import DEFAULT_TEMPLATE, LoraArgs, ModelArgs, QuantizationArgs
from core.errors import InputError
from train.__main__ import main as train_main
from train.data import read_corpus
from train.vocab import ID_MAP, TRIM_REPORT, trim_vocab
from train.vocab_tokenizer import trim_tokenizer_json

CPU = torch.device("cpu")
BYTES = [f"<0x{i:02X}>" for i in range(256)]


# ------------------------------------------------------------------------------------------------- fixtures


def main(argv: list[str]) -> int:
    """``python -m train trim-vocab ARGV`` in this process."""
    return train_main(["trim-vocab", *argv])


def build_bpe_model(folder: Path) -> Path:
    """A Gemma-style BPE tokenizer (▁ for spaces, byte fallback, <pad>/<eos>/<bos>/<unk>, bos prepended),
    ~500 tokens (+ 256 bytes) trained on the sample prompts, plus a tiny random-init Gemma-3 causal LM on it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # no-op after ▁: one word
    # The byte tokens are part of the model vocabulary (ids 4..259), like Gemma's; they are not "added" tokens.
    tok.train_from_iterator(sample_prompts(), trainers.BpeTrainer(vocab_size=760, special_tokens=specials + BYTES,
                                                                   max_token_length=8, show_progress=False))
    tj = json.loads(tok.to_str())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] in specials]
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gemma3", fast)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    return build_bpe_model(tmp_path_factory.mktemp("bpe") / "gemma3-bpe")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 60 rows of sample_train: a corpus that uses part of the tiny vocabularies."""
    return read_corpus([_head_csv(tmp_path_factory.mktemp("corpus"), 60)], SAMPLE_TEMPLATE)


@pytest.fixture(scope="module")
def trimmed_bpe(bpe_model, corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trimmed") / "bpe"
    foreign = tmp_path_factory.mktemp("foreign") / "foreign.csv"
    # Characters the original vocabulary has but the corpus never uses: trimmed away, so they fall back to bytes.
    from transformers import AutoTokenizer

    seen = set("".join(corpus.texts).replace(" ", "▁"))
    unseen = sorted(t for t in AutoTokenizer.from_pretrained(bpe_model).get_vocab() if len(t) == 1 and t not in seen)
    assert unseen
    pd.DataFrame({"assessment": [1.0, 2.0], "tags": ["{DELIVERY}", ""],
                  "text": ["".join(unseen), "Доставка ёжиков: Zebra Quiz 🦔"]}).to_csv(foreign, index=False)
    report = trim_vocab(str(bpe_model), corpus, out, eval_corpora=[read_corpus([SAMPLE_TEST]),
                                                                    read_corpus([foreign])])
    return out, report


def classifier(path, num_labels=3):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels,
                                                              dtype=torch.float32).eval()


def assert_same_logits(orig: Path, trimmed: Path, texts: list[str]):
    """Same base weights and the same score head: identical classifier logits on corpus texts."""
    from transformers import AutoTokenizer

    a, b = classifier(orig), classifier(trimmed)
    b.score.weight.data.copy_(a.score.weight.data)
    ta, tb = AutoTokenizer.from_pretrained(orig), AutoTokenizer.from_pretrained(trimmed)
    kept = json.loads((trimmed / ID_MAP).read_text())["kept_old_ids"]
    with torch.no_grad():
        for text in texts:
            ia, ib = ta(text)["input_ids"], tb(text)["input_ids"]
            assert [kept[i] for i in ib] == ia
            la = a(input_ids=torch.tensor([ia])).logits
            lb = b(input_ids=torch.tensor([ib])).logits
            assert torch.allclose(la, lb, atol=1e-6, rtol=0), (text, la, lb)


# ---------------------------------------------------------------------------------------------- WordLevel


@pytest.mark.parametrize("arch", ["gemma2", "mistral", "gemma3"])
def test_wordlevel_round_trip(tiny_models, corpus, tmp_path, arch):
    from transformers import AutoConfig, AutoTokenizer

    src = tiny_models[arch]
    out = tmp_path / "out"
    report = trim_vocab(str(src), corpus, out)
    orig_tok, tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert report["tokenizer_model"] == "WordLevel"
    assert report["kept_rows"] == len(tok) < report["original_rows"] == len(orig_tok)
    assert report["corpus"]["coverage"] == 1.0 and report["corpus"]["unk_tokens"] == 0
    kept = json.loads((out / ID_MAP).read_text())["kept_old_ids"]
    assert kept == sorted(kept) and len(kept) == len(tok)
    # Special tokens keep their meaning; config ids point at them.
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.vocab_size == len(tok)
    for name in ("bos", "eos", "unk"):
        assert getattr(tok, f"{name}_token") == getattr(orig_tok, f"{name}_token")
        assert kept[getattr(tok, f"{name}_token_id")] == getattr(orig_tok, f"{name}_token_id")
    assert cfg.bos_token_id == tok.bos_token_id and cfg.eos_token_id == tok.eos_token_id
    if orig_tok.pad_token is not None:
        assert cfg.pad_token_id == tok.pad_token_id and kept[tok.pad_token_id] == orig_tok.pad_token_id
    # Untied (Mistral) heads are trimmed too; the check in the report is exact.
    assert report["parameters"]["tied_lm_head"] is (arch != "mistral")
    assert report["check"]["max_abs_diff_hidden"] == 0.0
    assert report["check"]["max_abs_diff_lm_logits_kept_columns"] == 0.0
    assert_same_logits(src, out, corpus.texts[:4])
    # A word outside the corpus is the unknown token (no byte fallback in a word-level vocabulary).
    word = next(w for w in orig_tok.get_vocab() if w.isalpha() and w not in tok.get_vocab())
    assert tok(word)["input_ids"][-1] == tok.unk_token_id


def _head_csv(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"head{n}.csv"
    pd.read_csv(SAMPLE_TRAIN).head(n).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------------- BPE


def test_bpe_tokenizer_is_gemma_like(bpe_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_model)
    assert 700 <= len(tok) <= 770
    tj = json.loads(tok.backend_tokenizer.to_str())
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] and tj["model"]["merges"]
    ids = tok("Ёж 🦔")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback in the original too


def test_bpe_round_trip_ids_and_logits(bpe_model, trimmed_bpe, corpus):
    from transformers import AutoTokenizer

    out, report = trimmed_bpe
    orig_tok, tok = AutoTokenizer.from_pretrained(bpe_model), AutoTokenizer.from_pretrained(out)
    kept = json.loads((out / ID_MAP).read_text())["kept_old_ids"]
    assert report["tokenizer_model"] == "BPE" and report["byte_fallback"]
    assert report["kept_rows"] == len(tok) == len(kept) < len(orig_tok)
    assert report["corpus"]["coverage"] == 1.0 and report["corpus"]["identical_texts"] == len(corpus.texts)
    assert report["kept_why"]["byte_fallback"] > 0
    assert 0 < report["merges"]["kept"] < report["merges"]["original"]
    # Every corpus text: trimmed ids map back to the original ids.
    for text in corpus.texts:
        assert [kept[i] for i in tok(text)["input_ids"]] == orig_tok(text)["input_ids"]
    # All 256 byte tokens survive; kept merges only involve kept tokens.
    vocab = tok.get_vocab()
    assert all(b in vocab for b in BYTES)
    # Printable ASCII characters stay themselves (--keep-ascii), used by the corpus or not.
    ascii_chars = {t for t in orig_tok.get_vocab() if len(t) == 1 and 32 < ord(t) < 127}
    assert ascii_chars and ascii_chars <= set(vocab) and report["kept_why"]["ascii_chars"] >= 0
    tj = json.loads((out / "tokenizer.json").read_text())
    for a, b in tj["model"]["merges"]:
        assert a in vocab and b in vocab and a + b in vocab
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert report["check"]["max_abs_diff_hidden"] == 0.0
    assert_same_logits(bpe_model, out, corpus.texts[:6])
    saved = json.loads((out / TRIM_REPORT).read_text())
    assert saved["kept_rows"] == report["kept_rows"] and saved["folder_bytes"] > 0


def test_bpe_byte_fallback_outside_the_corpus(bpe_model, trimmed_bpe):
    from transformers import AutoTokenizer

    out, report = trimmed_bpe
    orig_tok, tok = AutoTokenizer.from_pretrained(bpe_model), AutoTokenizer.from_pretrained(out)
    kept = json.loads((out / ID_MAP).read_text())["kept_old_ids"]
    # A character that the original vocabulary has but the corpus never uses: its bytes, decoded back exactly.
    dropped = [t for t in orig_tok.get_vocab() if t not in tok.get_vocab() and len(t) == 1 and ord(t) > 127]
    text = "Доставка ёжиков 🦔" + (dropped[0] if dropped else "Ж")
    ids = tok(text)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == orig_tok.decode(orig_tok(text)["input_ids"],
                                                                         skip_special_tokens=True) == text
    # The report measures the eval corpora: sample_test is mostly covered, the foreign CSV falls back to bytes.
    sample_eval, foreign = report["eval"]
    assert sample_eval["texts"] == len(read_corpus([SAMPLE_TEST]).texts)
    assert 0 < foreign["byte_fallback_tokens"] and foreign["unk_tokens"] == 0
    assert foreign["byte_fallback_tokens"] > foreign["byte_fallback_tokens_original"]
    assert foreign["texts_with_fallback_or_unk"] == 2 and foreign["coverage"] < 1
    assert foreign["tokens_trimmed"] >= foreign["tokens_original"]
    del kept


def test_bpe_without_bytes_keeps_only_used_bytes(bpe_model, corpus, tmp_path):
    out = tmp_path / "nobytes"
    report = trim_vocab(str(bpe_model), corpus, out, keep_bytes=False, keep_ascii=False, check_texts=2)
    assert report["corpus"]["coverage"] == 1.0 and "byte_fallback" not in report["kept_why"]
    assert "ascii_chars" not in report["kept_why"] and not report["keep_ascii"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert sum(b in tok.get_vocab() for b in BYTES) < 256
    assert tok.unk_token_id in tok("🦔")["input_ids"]        # deliberate: unknown, not silently dropped


def test_trimmed_folder_trains_like_any_model(trimmed_bpe):
    """The toolkit's 4-bit loader and LoRA wiring take the trimmed folder with no special case."""
    import bitsandbytes as bnb

    from core.data import collate
    from core.model import autocast, load_classifier
    from train.lora import apply_lora

    out, report = trimmed_bpe
    path = str(out)
    model, tok, dtype = load_classifier(path, 3, ModelArgs(name_or_path=path), QuantizationArgs(), CPU)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.get_input_embeddings().weight.shape[0] == report["kept_rows"] == model.config.vocab_size
    assert tok.pad_token_id == model.config.pad_token_id is not None
    model = apply_lora(model, LoraArgs(r=2, alpha=4, dropout=0.0), grad_checkpointing=False)
    batch = collate([tok(t)["input_ids"] for t in read_corpus([SAMPLE_TEST]).texts[:4]], tok.pad_token_id,
                    labels=[[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    with autocast(CPU, dtype):  # as the training step runs it (bf16 compute on CPUs with native bf16)
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_cli_writes_folder_and_report(tiny_models, tmp_path, capsys):
    out = tmp_path / "cli"
    csv = _head_csv(tmp_path, 30)
    rc = main(["--model", str(tiny_models["gemma3"]), "--corpus", f"{csv},{SAMPLE_TEST}", "--out", str(out),
               "--check-texts", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kept_rows" in printed and "corpus coverage 100.0%" in printed
    report = json.loads((out / TRIM_REPORT).read_text())
    assert [f["path"] for f in report["corpus"]["files"]] == [str(csv), str(SAMPLE_TEST)]
    assert report["template"] == DEFAULT_TEMPLATE
    # Existing output folder: refused unless --overwrite.
    assert main(["--model", str(tiny_models["gemma3"]), "--corpus", str(csv), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--model", str(tiny_models["gemma3"]), "--corpus", str(csv), "--out", str(out), "--overwrite",
                 "--template", "Review: {text}", "--check-texts", "1", "--keep-added", "all"]) == 0
    assert json.loads((out / TRIM_REPORT).read_text())["template"] == "Review: {text}"


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_are_clear_errors(tiny_models, tmp_path, capsys):
    model = str(tiny_models["gemma3"])
    empty = tmp_path / "empty.csv"
    pd.DataFrame(columns=["assessment", "tags", "text"]).to_csv(empty, index=False)
    blank = tmp_path / "blank.csv"
    pd.DataFrame({"assessment": [None, None], "tags": ["", ""], "text": ["", " "]}).to_csv(blank, index=False)
    zero = tmp_path / "zero.csv"
    zero.write_text("")
    nocol = tmp_path / "nocol.csv"
    pd.DataFrame({"review": ["hello"]}).to_csv(nocol, index=False)
    cases = {
        str(tmp_path / "missing.csv"): "file not found",
        str(empty): "empty (no rows)",
        str(zero): "empty",
        str(blank): "has no text",
        str(nocol): "missing column(s)",
    }
    for csv, needle in cases.items():
        out = tmp_path / "never"
        assert main(["--model", model, "--corpus", csv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and csv in err, (csv, err)
        assert not out.exists()
    assert main(["--model", str(tmp_path / "nope"), "--corpus", str(SAMPLE_TEST), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(InputError, match="is the model folder"):
        trim_vocab(model, read_corpus([SAMPLE_TEST]), model, overwrite=True)


def test_no_overlap_is_an_error(tiny_models, bpe_model, tmp_path):
    """Word-level: every word unknown. BPE: every character outside the vocabulary (only byte fallback)."""
    for model, texts in ((tiny_models["mistral"], ["zyxwv qqqq", "xylophone zebra", "quokka"]),
                         (bpe_model, ["漢字 🦔", "ひらがな", "😀 😀"])):
        foreign = tmp_path / "foreign.csv"
        pd.DataFrame({"assessment": [None] * 3, "tags": [""] * 3, "text": texts}).to_csv(foreign, index=False)
        out = tmp_path / "out"
        with pytest.raises(InputError, match=r"no overlap with the vocabulary") as e:
            trim_vocab(str(model), read_corpus([foreign]), out)
        assert str(foreign) in str(e.value)
        assert not out.exists() and not list(tmp_path.glob(".out.*"))   # nothing half-written


def test_unsupported_tokenizer_model(tmp_path):
    from tokenizers import Tokenizer, models

    tj = json.loads(Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).to_str())
    with pytest.raises(InputError, match="'WordPiece' is not supported"):
        trim_tokenizer_json(tj, {0, 1})


def test_unigram_round_trip(corpus, tmp_path):
    """SentencePiece-style Unigram tokenizers: a subset of pieces keeps the best segmentation of corpus texts."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(sample_prompts(), trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    src = tmp_path / "unigram"
    fast.save_pretrained(src)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("mistral", fast)).save_pretrained(src)
    out = tmp_path / "out"
    report = trim_vocab(str(src), corpus, out, check_texts=3)
    assert report["tokenizer_model"] == "Unigram" and report["corpus"]["coverage"] == 1.0
    assert report["kept_rows"] < report["original_rows"]
    assert report["check"]["max_abs_diff_lm_logits_kept_columns"] == 0.0
    new = AutoTokenizer.from_pretrained(out)
    kept = json.loads((out / ID_MAP).read_text())["kept_old_ids"]
    for text in corpus.texts:
        assert [kept[i] for i in new(text)["input_ids"]] == fast(text)["input_ids"]
