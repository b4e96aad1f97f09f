"""infer.export on the tiny trained run: the merged folder loads with plain transformers (no peft/bitsandbytes) and
gives base + adapter's probabilities (non-4-bit, fp32) within 1e-5; provenance, card, id2label; bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from infer.__main__ import main
from infer.export import TOLERANCE, export

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TEST = REPO / "data" / "sample_test.csv"


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "merged"
    info = export(str(tiny_run / "fold_0" / "last"), out, dtype="fp32")
    return out, info


def _adapter_probs_fp32(adapter: Path, texts: list[str]) -> np.ndarray:
    """Base (fp32, no 4-bit) + adapter with peft, the way the export loads it: the reference for the merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from core.adapter import read_adapter
    from core.model import load_tokenizer, predict_probs

    ref = read_adapter(adapter)
    tok = load_tokenizer(str(adapter))
    base = AutoModelForSequenceClassification.from_pretrained(
        ref.cfg.model.name_or_path, num_labels=len(ref.label_names), problem_type="multi_label_classification",
        dtype=torch.float32, attn_implementation="eager", pad_token_id=tok.pad_token_id)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = [list(t) for t in tok(texts, truncation=True, max_length=ref.cfg.data.max_length)["input_ids"]]
    return predict_probs(model, ids, tok.pad_token_id, 8, torch.float32, progress=False)


# Runs in a fresh interpreter where importing peft or bitsandbytes fails: the folder needs neither.
PLAIN_LOAD = r"""
import json, sys
sys.modules["peft"] = None
sys.modules["bitsandbytes"] = None
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
out = []
with torch.no_grad():
    for t in texts:  # one at a time: no padding question
        enc = tok([t], return_tensors="pt", truncation=True, max_length=64)
        out.append(torch.sigmoid(model(**enc).logits.float())[0].tolist())
print(json.dumps({"probs": out, "id2label": model.config.id2label, "problem_type": model.config.problem_type,
                  "pad_token_id": model.config.pad_token_id, "peft": "peft" in sys.modules and sys.modules["peft"] is not None}))
"""


def test_merged_folder_loads_without_peft_and_matches_the_adapter(tiny_run, exported):
    from core.adapter import read_adapter
    from core.data import read_csv

    out, _ = exported
    adapter = tiny_run / "fold_0" / "last"
    ref = read_adapter(adapter)
    texts = read_csv(SAMPLE_TEST, ref.cfg.data, labelled=False).texts[:12]
    r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(texts)], capture_output=True,
                       text=True, cwd=REPO, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not got["peft"]
    assert got["id2label"] == {str(i): n for i, n in enumerate(ref.label_names)}
    assert got["problem_type"] == "multi_label_classification" and got["pad_token_id"] == 0
    want = _adapter_probs_fp32(adapter, texts)
    np.testing.assert_allclose(np.array(got["probs"]), want, atol=TOLERANCE["fp32"])
    assert TOLERANCE["fp32"] == 1e-5
    # The trained head really is in there: another fold's adapter gives other probabilities.
    assert np.abs(_adapter_probs_fp32(tiny_run / "fold_1" / "last", texts) - want).max() > 1e-3


def test_provenance_card_and_the_4bit_difference(tiny_run, exported):
    out, info = exported
    saved = json.loads((out / "export_info.json").read_text())
    assert saved == json.loads(json.dumps(info))
    d = saved["max_abs_prob_diff"]
    assert d["merged_vs_adapter"] <= 1e-5 and d["reloaded_vs_adapter"] <= 1e-5 and saved["within_tolerance"]
    # trained on a 4-bit base: the merged (full-precision base + delta) differs measurably from the 4-bit path
    assert saved["trained_4bit"] and 0 < d["merged_vs_4bit"] < 0.5
    assert saved["adapter"]["folder"] == str(tiny_run / "fold_0" / "last") and saved["adapter"]["fold"] == 0
    assert saved["dtype"] == "fp32" and saved["probe"]["rows"] == 16
    assert saved["config"]["data"]["text_template"] and {"torch", "transformers", "peft"} <= set(saved["versions"])
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "full-precision base + the LoRA delta" in card
    assert f"{d['merged_vs_4bit']:.2e}" in card
    assert json.loads((out / "label_names.json").read_text())["label_names"] == json.loads(
        (tiny_run / "label_names.json").read_text())["label_names"]
    assert not list(out.parent.glob(".*.tmp"))


def test_run_folder_needs_fold(tiny_run, tmp_path):
    with pytest.raises(InputError, match=r"run folder with 2 fold adapters .*--fold K"):
        export(str(tiny_run), tmp_path / "x", dtype="fp32")
    with pytest.raises(InputError, match=r"--fold 7: .* has no finished fold 7"):
        export(str(tiny_run), tmp_path / "x", dtype="fp32", fold=7)
    assert not (tmp_path / "x").exists()
    info = export(str(tiny_run), tmp_path / "f1", dtype="fp32", fold=1, compare_4bit=False)
    assert info["adapter"]["fold"] == 1 and info["max_abs_prob_diff"]["merged_vs_4bit"] is None


def test_bad_inputs_write_nothing(tiny_run, exported, tmp_path, capsys):
    out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(InputError, match="already exists"):
        export(str(tiny_run / "fold_0" / "last"), out, dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(InputError, match="adapter folder not found"):
        export(str(tmp_path / "nope"), tmp_path / "y")
    with pytest.raises(InputError, match="--dtype"):
        export(str(tiny_run / "fold_0" / "last"), tmp_path / "y", dtype="int8")
    assert not (tmp_path / "y").exists()

    assert main(["export", "--adapter", str(tiny_run), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --adapter") and "--fold K" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "z").exists()


def test_probe_csv(tiny_run, tmp_path):
    pd.read_csv(SAMPLE_TEST).head(5).to_csv(tmp_path / "probe.csv", index=False)
    info = export(str(tiny_run / "fold_0" / "last"), tmp_path / "p", dtype="bf16", probe=tmp_path / "probe.csv",
                  compare_4bit=False)
    assert info["probe"] == {"source": str(tmp_path / "probe.csv"), "rows": 5}
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and info["max_abs_prob_diff"]["reloaded_vs_adapter"] <= TOLERANCE["bf16"]
