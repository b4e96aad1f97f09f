"""python -m train merge: fold adapters (and runs) merged by peft's add_weighted_adapter into one ordinary adapter.
cat is exactly the mean of the LoRA deltas, svd the best rank-r approximation of it, the score heads averaged;
mismatched inputs refused naming the adapter; the merged folder predicts through infer predict and carries
thresholds tuned on the runs' out-of-fold rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SAMPLE_TEST
from safetensors.torch import load_file, save_file
from trainkit import run_cli, tiny_config_for

from core.adapter import WEIGHT_FILES, read_adapter, save_adapter
from core.errors import InputError
from core.io import read_probs, write_probs
from train import merge

HEAD = "base_model.model.score.weight"


@pytest.fixture(scope="module")
def run(tiny_model, small_csv, tmp_path_factory) -> Path:
    """Folds 0 and 1 of a 3-fold CV, 2 steps each (LoRA r=4 on every projection)."""
    from train.run import main

    out = tmp_path_factory.mktemp("merge") / "run"
    main(tiny_config_for(tiny_model, small_csv, out, cv__folds=[0, 1], train__num_epochs=1, train__max_steps=2))
    return out


def random_copy(src: Path, dst: Path, seed: int) -> Path:
    """A copy of adapter folder ``src`` with random LoRA A, B and head (trained 2 steps, B is nearly zero)."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(dst / WEIGHT_FILES[0])
    save_file({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in tensors.items()}, dst / WEIGHT_FILES[0])
    return dst


def deltas(tensors: dict, scale: float) -> dict:
    """Every adapted weight's LoRA delta B A * scale (float64)."""
    return {k: tensors[k.replace("lora_A", "lora_B")].double() @ tensors[k].double() * scale
            for k in tensors if k.endswith("lora_A.weight")}


@pytest.fixture(scope="module")
def random_refs(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("random")
    return [read_adapter(random_copy(run / f"fold_{k % 2}" / "last", root / f"a{k}", seed=k)) for k in range(3)]


def test_cat_is_exactly_the_mean_of_the_deltas_and_heads(random_refs):
    tensors, config, _ = merge.merge_lora(random_refs, "cat")
    assert (config.r, config.lora_alpha) == (12, 12) and config.modules_to_save   # ranks stacked, scaling 1
    sources = [load_file(r.folder / WEIGHT_FILES[0]) for r in random_refs]
    want = [deltas(s, 8 / 4) for s in sources]   # lora_alpha 8 / r 4
    got = deltas(tensors, 1.0)
    assert got.keys() == want[0].keys() and len(got) == 2 * 7   # 2 layers x 7 projections
    for k in got:
        mean = sum(w[k] for w in want) / 3
        assert mean.abs().max() > 0.5
        torch.testing.assert_close(got[k].float(), mean.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(tensors[HEAD], sum(s[HEAD] for s in sources) / 3, atol=1e-6, rtol=0)
    assert merge.delta_error(random_refs, tensors, config)["max"] < 1e-6


def test_svd_keeps_rank_r_and_is_the_best_rank_r_approximation(random_refs):
    tensors, config, _ = merge.merge_lora(random_refs, "svd")
    assert (config.r, config.lora_alpha) == (4, 4)
    sources = [load_file(r.folder / WEIGHT_FILES[0]) for r in random_refs]
    want = [deltas(s, 2.0) for s in sources]
    for k, got in deltas(tensors, 1.0).items():
        a, b = tensors[k], tensors[k.replace("lora_A", "lora_B")]
        assert a.shape[0] == 4 and b.shape[1] == 4
        u, s, vh = torch.linalg.svd(sum(w[k] for w in want) / 3)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]   # Eckart-Young: the closest rank-4 matrix
        torch.testing.assert_close(got, best, atol=1e-4, rtol=0)
    torch.testing.assert_close(tensors[HEAD], sum(s[HEAD] for s in sources) / 3, atol=1e-6, rtol=0)
    error = merge.delta_error(random_refs, tensors, config)
    assert 0.05 < error["max"] < 1   # rank 12 of information kept at 4: an approximation, said so


def test_merged_adapter_predicts_through_infer_predict(run, tmp_path):
    """The same fold adapter merged with itself: its mean delta and head are its own, so the merged folder (rank 8,
    scaling 1, written as a fold adapter is) must predict what the fold adapter predicts."""
    from infer.predict import predict

    ref = read_adapter(run / "fold_0" / "last")
    tensors, config, tok = merge.merge_lora([ref, ref], "cat")
    assert config.r == 8
    out = tmp_path / "merged"
    save_adapter(merge.MergedAdapter(tensors, config), tok, out, ref.cfg, ref.label_names, ref.descriptions, {})
    for folder, name in [(ref.folder, "fold.csv"), (out, "merged.csv")]:
        predict([str(folder)], SAMPLE_TEST, tmp_path / name, progress=False)
    _, p_fold, _ = read_probs(tmp_path / "fold.csv")
    _, p_merged, _ = read_probs(tmp_path / "merged.csv")
    np.testing.assert_allclose(p_merged, p_fold, atol=1e-5)


def test_mismatched_adapters_are_refused_naming_the_adapter(run, tmp_path):
    import dataclasses

    ref = read_adapter(run / "fold_0" / "last")
    other = tmp_path / "r8"
    shutil.copytree(run / "fold_1" / "last", other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(InputError, match=rf"{other}: LoRA r 8 differs from .*fold_0/last's 4"):
        merge.check_mergeable([ref, read_adapter(other)])
    (other / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InputError, match=rf"{other}: a DoRA adapter"):
        merge.check_mergeable([ref, read_adapter(other)])
    shutil.copytree(run / "fold_1" / "last", tmp_path / "x")
    shutil.copytree(run / "fold_1" / "last", tmp_path / "y")
    names = dataclasses.replace(ref, folder=tmp_path / "x", label_names=[f"c{i}" for i in range(20)])
    with pytest.raises(InputError, match=r"x: labels 20 labels \['c0'.* differs from .*fold_0/last's 20 labels "
                                         r"\['trend_id_res0'"):
        merge.check_mergeable([ref, names])
    base = dataclasses.replace(ref, folder=tmp_path / "y", cfg=dataclasses.replace(
        ref.cfg, model=dataclasses.replace(ref.cfg.model, name_or_path="other/model")))
    with pytest.raises(InputError, match=r"y: base model \('other/model', None\) differs"):
        merge.check_mergeable([ref, base])


def test_mean_oof_of_several_runs(run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(run, d)
    ids, probs, names = read_probs(run / "oof.csv")
    order = np.arange(len(ids))[::-1]   # other row order: matched by id
    write_probs(b / "oof.csv", ids[order], 1 - probs[order], names, meta={"kind": "out-of-fold probabilities"})
    sources = merge.read_runs([str(a), str(b)])
    path, nested = merge.mean_oof(sources, tmp_path)
    got_ids, got, _ = read_probs(path)
    assert nested and list(got_ids) == list(ids)
    np.testing.assert_allclose(got, 0.5, atol=2e-6)
    write_probs(b / "oof.csv", ids[:-1], probs[:-1], names)
    with pytest.raises(InputError, match=r"b/oof.csv: out-of-fold rows differ"):
        merge.mean_oof(merge.read_runs([str(a), str(b)]), tmp_path)
    with pytest.raises(InputError, match="given twice"):
        merge.read_runs([str(a), str(a)])


def test_merge_of_two_runs_library(run, small_csv, tmp_path, monkeypatch):
    """Two runs (here a copy: seeds would differ): every fold adapter of both, provenance, thresholds from the
    mean out-of-fold file (the tuner faked: the command line test runs it)."""
    second = tmp_path / "seed2"
    shutil.copytree(run, second)
    calls = []
    monkeypatch.setattr(merge, "tune_thresholds",
                        lambda oof, *a: calls.append((oof, a)) or {"label_names": ["x"], "meta": {"oof": str(oof)}})
    info = merge.merge([str(run), str(second)], tmp_path / "out", method="cat")
    merged = info["merged"]
    assert merged["runs"] == [str(run), str(second)] and len(merged["adapters"]) == 4
    assert merged["weights"] == [0.25] * 4 and merged["rank"] == 16 and merged["delta_vs_mean"]["max"] < 1e-6
    oof, (labels, folds, strategy, nested, provenance) = calls[0]
    assert oof.name == "oof.csv" and oof.parent not in (run, second)   # the mean of the two runs' files
    assert (labels, folds, strategy, nested) == (str(small_csv), run / "folds.csv", "cascade", True)
    assert provenance["oof"] == [str(run / "oof.csv"), str(second / "oof.csv")]
    thresholds = json.loads((tmp_path / "out" / "thresholds.json").read_text())
    assert thresholds["meta"]["oof"] == f"{run / 'oof.csv'} + {second / 'oof.csv'}"
    ref = read_adapter(tmp_path / "out")
    assert ref.cfg.lora.r == 16 and ref.head_labels == 20


def test_tune_thresholds_runs_the_tuner_in_process_and_writes_nothing(run, small_csv, tmp_path):
    """core.tuning's run_tune called directly: the thresholds document with its provenance, no file written beside
    the run; a tuner failure is an InputError carrying the tuner's message."""
    from core.thresholds import ThresholdSpec

    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    doc = merge.tune_thresholds(run / "oof.csv", small_csv, run / "folds.csv", "cascade", False, {"for": "x"})
    spec = ThresholdSpec.from_dict(doc)
    assert spec.label_names == tuple(read_adapter(run / "fold_0" / "last").label_names)
    meta = doc["meta"]
    assert meta["adapter_thresholds"] == {"for": "x"} and meta["nested"] is None
    assert meta["produced_by"] == "python -m infer tune" and meta["oof"] == str(run / "oof.csv")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    bad = tmp_path / "labels.csv"
    bad.write_text("id,other\n0,1\n")
    with pytest.raises(InputError, match=r"tuning thresholds on .*oof\.csv failed: .*labels\.csv"):
        merge.tune_thresholds(run / "oof.csv", bad, run / "folds.csv", "cascade", True, {})


def test_merge_command(run, tmp_path):
    out = tmp_path / "merged"
    res = run_cli(["merge", "--run", str(run), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "relative Frobenius error" in res.stdout and "nested estimate" in res.stdout
    fold_files = {p.name for p in (run / "fold_0" / "last").iterdir()}
    assert {p.name for p in out.iterdir()} == fold_files | {"thresholds.json"}
    info = json.loads((out / "adapter_info.json").read_text())
    assert info["merged"]["adapters"] == [str(run / f"fold_{k}" / "last") for k in (0, 1)]
    assert info["merged"]["method"] == "cat" and info["versions"]["peft"]
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["meta"]["oof"] == str(run / "oof.csv")
    assert thresholds["meta"]["adapter_thresholds"]["for"] == str(out)
    predicted = run_cli(["predict", "--adapter", str(out), "--input", str(SAMPLE_TEST), "--out",
                         str(tmp_path / "probs.csv")], module="infer")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "probs.csv")) == len(pd.read_csv(SAMPLE_TEST))
    # An existing --out is refused before anything loads; nothing changes.
    again = run_cli(["merge", "--run", str(run), "--out", str(out)])
    assert again.returncode == 2 and "already exists" in again.stderr
    assert json.loads((out / "adapter_info.json").read_text()) == info
