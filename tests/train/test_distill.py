"""python -m train distill: the mixed loss, honest per-fold teacher targets (no leak), refused teachers, resume, and
one end-to-end student of a real (tiny) teacher run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from trainkit import SAMPLE_TRAIN, as_set_args, kill_at_launcher, run_cli, tiny_config_for, tiny_overrides

import train.__main__ as cli
from core.config import LossArgs, RunConfig
from core.data import read_csv
from core.errors import ConfigError, InputError
from core.io import meta_path, read_probs
from train import distill
from train.data import make_folds
from train.loss import distill_loss, multilabel_loss

# ------------------------------------------------------------------------------------------------------------ loss


def _batch(seed=0, rows=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=g, requires_grad=True)
    labels = (torch.rand(rows, classes, generator=g) > 0.5).float()
    soft = torch.rand(rows, classes, generator=g)
    return logits, labels, soft


def test_distill_loss_alpha_0_is_soft_only_and_1_is_hard_only():
    logits, labels, soft = _batch()
    everyone = torch.ones(6, dtype=torch.bool)
    args = LossArgs()
    soft_only = distill_loss(logits, labels, soft, everyone, 0.0, args)
    assert torch.allclose(soft_only, F.binary_cross_entropy_with_logits(logits, soft))
    hard_only = distill_loss(logits, labels, soft, everyone, 1.0, args)
    assert torch.allclose(hard_only, multilabel_loss(logits, labels, args))
    # Hard only ignores the soft targets, soft only the labels.
    assert torch.allclose(distill_loss(logits, labels, 1 - soft, everyone, 1.0, args), hard_only)
    assert torch.allclose(distill_loss(logits, 1 - labels, soft, everyone, 0.0, args), soft_only)
    mixed = distill_loss(logits, labels, soft, everyone, 0.3, args)
    assert torch.allclose(mixed, 0.3 * hard_only + 0.7 * soft_only)
    # The hard term is the configured loss (focal here).
    focal = LossArgs(name="focal")
    assert torch.allclose(distill_loss(logits, labels, soft, everyone, 1.0, focal),
                          multilabel_loss(logits, labels, focal))


def test_unlabelled_rows_carry_no_hard_term():
    logits, labels, soft = _batch(1)
    labelled = torch.tensor([True, True, False, True, False, False])
    args = LossArgs()
    loss = distill_loss(logits, labels, soft, labelled, 0.4, args)
    # Whatever the (meaningless) labels of unlabelled rows, the loss is the same ...
    other = labels.clone()
    other[~labelled] = 1 - other[~labelled]
    assert torch.allclose(distill_loss(logits, other, soft, labelled, 0.4, args), loss)
    # ... it is the hard term of the labelled rows (weighted by their share) + the soft term of every row ...
    expected = 0.4 * multilabel_loss(logits[labelled], labels[labelled], args) * 3 / 6 \
        + 0.6 * F.binary_cross_entropy_with_logits(logits, soft)
    assert torch.allclose(loss, expected)
    # ... and with the hard term alone, unlabelled rows get no gradient.
    distill_loss(logits, labels, soft, labelled, 1.0, args).backward()
    assert torch.all(logits.grad[~labelled] == 0) and torch.any(logits.grad[labelled] != 0)


def test_combine_weights_and_temperature():
    a, b = np.full((2, 3), 0.9), np.full((2, 3), 0.3)
    np.testing.assert_allclose(distill.combine([a, b], [1, 1], 1.0), 0.6)
    np.testing.assert_allclose(distill.combine([a, b], [3, 1], 1.0), 0.75)
    # Temperature on the teacher logits: logit(0.9) / 2 -> sigmoid = 0.75; a huge one -> 0.5.
    np.testing.assert_allclose(distill.combine([a], [1], 2.0), 0.75)
    np.testing.assert_allclose(distill.combine([a, b], [1, 1], 1e6), 0.5, atol=1e-6)


def test_distill_config_checks():
    base = {"distill": {"teachers": ["t"]}}
    for bad, key in [({"alpha": 1.5}, "distill.alpha"), ({"temperature": 0}, "distill.temperature"),
                     ({"teacher_weights": [1, 2]}, "distill.teacher_weights"),
                     ({"unlabelled_csv": "u.csv", "alpha": 1.0}, "distill.alpha=1")]:
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_dict({"distill": {**base["distill"], **bad}})
    with pytest.raises(ConfigError, match="distill.final moved to cv.final"):
        RunConfig.from_dict({"distill": {**base["distill"], "final": True}})
    with pytest.raises(ConfigError, match="needs distill.teachers"):
        RunConfig.from_dict({"distill": {"unlabelled_csv": "u.csv"}})
    with pytest.raises(ConfigError, match="unknown"):
        RunConfig.from_dict({"distill": {"teacher": ["t"]}})


# ------------------------------------------------------------------------------------------------------- teachers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 labelled rows, 20 unlabelled ones (other ids, no label columns)."""
    root = tmp_path_factory.mktemp("distill_data")
    df = pd.read_csv(SAMPLE_TRAIN)
    df.head(60).to_csv(root / "train.csv", index=False)
    df.iloc[60:80][["index", "assessment", "tags", "text"]].to_csv(root / "unlabelled.csv", index=False)
    return root


def fake_teacher_run(folder, cfg: RunConfig, fold_of_row=None):
    """A python -m train run folder with every fold 'finished' (no weights: predict_fold is faked)."""
    ds = read_csv(cfg.data.train_csv, cfg.data)
    folder.mkdir(parents=True)
    fold_of_row = make_folds(ds.labels, cfg.cv.n_folds, cfg.train.seed) if fold_of_row is None else fold_of_row
    pd.DataFrame({"index": ds.ids, "fold": fold_of_row}).to_csv(folder / "folds.csv", index=False)
    (folder / "run_config.yaml").write_text(cfg.to_yaml())
    (folder / "label_names.json").write_text(json.dumps({"label_names": ds.label_names}))
    for k in range(cfg.cv.n_folds):
        (folder / f"fold_{k}" / "last").mkdir(parents=True)
        (folder / f"fold_{k}" / "metrics.json").write_text("{}")
        (folder / f"fold_{k}" / "last" / "adapter_config.json").write_text("{}")
    return folder


def test_student_of_fold_k_learns_only_from_teacher_fold_k(tiny_model, data, tmp_path, monkeypatch):
    """A fake teacher whose fold-k model predicts 0.1 + 0.2 k: the student's fold-k targets are exactly that, on its
    training rows and the unlabelled rows only; fold k's own rows get none; no other fold model is asked."""
    import train.run

    teacher_cfg = tiny_config_for(tiny_model, data / "train.csv", tmp_path / "teacher")
    teacher = fake_teacher_run(tmp_path / "teacher", teacher_cfg)
    calls = []

    def fake_predict(t, fold, texts, device):
        calls.append((fold, len(texts)))
        return np.full((len(texts), 20), 0.1 + 0.2 * fold)

    captured = {}
    real_train_fold = train.run.train_fold

    def spy_train_fold(run, rows, fold):
        captured[fold.index] = (fold.targets, rows.fold_of_row)  # SoftTargets, fold_of_row of the trained rows
        return real_train_fold(run, rows, fold)

    monkeypatch.setattr(distill, "predict_fold", fake_predict)
    monkeypatch.setattr(train.run, "train_fold", spy_train_fold)
    cfg = tiny_config_for(tiny_model, data / "train.csv", tmp_path / "student", cv__folds=[0, 1],
                          train__num_epochs=1, train__max_steps=1,
                          distill={"teachers": [str(teacher)], "unlabelled_csv": str(data / "unlabelled.csv")})
    summary = train.run.main(cfg)
    fold_of_row = pd.read_csv(tmp_path / "student" / "folds.csv")["fold"].to_numpy()
    n_train = {k: int((fold_of_row != k).sum()) for k in (0, 1)}
    assert sorted(calls) == [(0, n_train[0] + 20), (1, n_train[1] + 20)]   # teacher fold 2 never asked
    for k in (0, 1):
        targets, trained_folds = captured[k]
        assert len(trained_folds) == 80 and (trained_folds[60:] == -1).all()   # unlabelled: in no fold
        val = np.flatnonzero(trained_folds == k)
        rest = np.flatnonzero(trained_folds != k)
        assert np.isnan(targets.soft[val]).all()                           # validation rows: no target
        np.testing.assert_allclose(targets.soft[rest], 0.1 + 0.2 * k, atol=1e-6)  # fold-k teacher only
        assert targets.labelled[:60].all() and not targets.labelled[60:].any()
        ids, _, _ = read_probs(tmp_path / "student" / "teachers" / f"t0_fold_{k}.csv")
        fold_ids = pd.read_csv(data / "train.csv")["index"].to_numpy()[fold_of_row == k]
        assert len(ids) == n_train[k] + 20 and not set(ids.tolist()) & set(fold_ids.tolist())
    # Provenance: summary, teachers.json and every adapter name the teacher.
    assert summary["distill"]["teachers"][0]["teacher"] == str(teacher)
    assert summary["distill"]["unlabelled_rows"] == 20
    info = json.loads((tmp_path / "student" / "fold_1" / "last" / "adapter_info.json").read_text())
    assert info["distill"]["teachers"][0]["fold_models"]["1"].endswith("teacher/fold_1/last")
    assert json.loads((tmp_path / "student" / "teachers" / "teachers.json").read_text())["alpha"] == 0.5
    oof = pd.read_csv(tmp_path / "student" / "oof.csv")
    assert len(oof) == int(np.isin(fold_of_row, [0, 1]).sum())  # labelled validation rows only


def test_final_student_trains_on_every_row_with_fold_averaged_teachers(tiny_model, data, tmp_path, monkeypatch):
    import train.merge
    import train.run

    teacher = fake_teacher_run(tmp_path / "teacher", tiny_config_for(tiny_model, data / "train.csv", tmp_path / "t"))
    calls, captured = [], {}

    def fake_predict(t, fold, texts, device):
        calls.append((fold, len(texts)))
        return np.full((len(texts), 20), 0.1 + 0.2 * fold)

    real_train_fold = train.run.train_fold

    def spy_train_fold(run, rows, fold):
        captured[fold.name] = (fold.targets, fold.train_idx, fold.val_idx)
        return real_train_fold(run, rows, fold)

    monkeypatch.setattr(distill, "predict_fold", fake_predict)
    monkeypatch.setattr(train.run, "train_fold", spy_train_fold)
    tuned = []   # the final model's thresholds: python -m infer tune on the student's out-of-fold rows
    monkeypatch.setattr(train.merge, "tune_thresholds", lambda *a, **k: tuned.append(a) or {"meta": {}})
    raw = tiny_overrides(tiny_model, data / "train.csv", tmp_path / "student", train__num_epochs=1,
                         train__max_steps=2, distill={"teachers": [str(teacher)],
                                                      "unlabelled_csv": str(data / "unlabelled.csv")})
    train.run.main(RunConfig.from_dict(raw))        # fold 0 only ...
    raw["cv"]["final"] = True                       # ... then the final student added on resume (allowed)
    summary = train.run.main(RunConfig.from_dict(raw), resume=True)
    assert calls[1:] == [(0, 80), (1, 80), (2, 80)]  # every teacher fold scores every row once
    targets, trained, held_out = captured["final student"]   # the final student: every row, none held out
    assert len(trained) == 80 and len(held_out) == 0
    np.testing.assert_allclose(targets.soft, 0.3, atol=1e-6)  # mean of the fold models 0.1, 0.3, 0.5
    assert targets.labelled.sum() == 60
    final = tmp_path / "student" / "final"
    info = json.loads((final / "last" / "adapter_info.json").read_text())
    assert info["final"] is True and info["distill"]["teachers"][0]["teacher"] == str(teacher)
    assert json.loads((final / "metrics.json").read_text())["samples"] == 2 * 8
    assert summary["final"]["adapter"] == str(final / "last") and summary["folds"] == [0]
    assert len(pd.read_csv(tmp_path / "student" / "oof.csv")) == 21   # the final student is not out of fold
    assert "cv.final" in (tmp_path / "student" / "resume_log.json").read_text()
    assert [a[0] for a in tuned] == [tmp_path / "student" / "oof.csv"]
    assert json.loads((final / "last" / "thresholds.json").read_text())["meta"] == {}


def test_tfidf_teacher_is_refit_without_fold_k(tiny_model, data, monkeypatch):
    import train.tfidf

    cfg = tiny_config_for(tiny_model, data / "train.csv", data / "unused")
    ds = read_csv(cfg.data.train_csv, cfg.data)
    folds = np.concatenate([make_folds(ds.labels, 3, 42), np.full(20, -1)])
    labels = np.zeros((80, 20), dtype=np.int8)
    labels[:60] = ds.labels
    seen = {}

    def fake_fit_predict(train_texts, train_labels, texts, c, seed):
        seen["fit"], seen["predict"] = set(train_texts), set(texts)
        return np.full((len(texts), 20), 0.5)

    monkeypatch.setattr(train.tfidf, "fit_predict", fake_fit_predict)
    texts = [f"row {i}" for i in range(80)]
    teacher = distill.Teacher(0, data, "tfidf", cfg, 1.0, c=2.0)
    rows = np.flatnonzero(folds != 1)
    distill.teacher_fold_probs(teacher, 1, texts, labels, folds, rows, torch.device("cpu"))
    fold1 = {texts[i] for i in np.flatnonzero(folds == 1)}
    unlabelled = set(texts[60:])
    assert not seen["fit"] & fold1 and not seen["fit"] & unlabelled          # fit: labelled rows outside fold 1
    assert seen["predict"] == set(texts) - fold1                              # scores the student's training rows
    with pytest.raises(ValueError, match="own rows"):
        distill.teacher_fold_probs(teacher, 1, texts, labels, folds, np.arange(80), torch.device("cpu"))


def test_bad_teachers_are_refused(tiny_model, data, tmp_path, capsys):
    cfg = tiny_config_for(tiny_model, data / "train.csv", tmp_path / "student", cv__folds=[0, 1])
    ds = read_csv(cfg.data.train_csv, cfg.data)
    fold_of_row = make_folds(ds.labels, 3, 42)

    def check(teacher, match):
        c = tiny_config_for(tiny_model, data / "train.csv", tmp_path / "student", cv__folds=[0, 1],
                            distill={"teachers": [str(teacher)]})
        with pytest.raises(InputError, match=match):
            distill.read_teachers(c, ds, fold_of_row, [0, 1])

    other = fake_teacher_run(tmp_path / "other_folds", cfg, fold_of_row=(fold_of_row + 1) % 3)
    check(other, r"folds.csv: the teacher's folds differ from the student's")
    seed = fake_teacher_run(tmp_path / "other_seed", tiny_config_for(tiny_model, data / "train.csv", tmp_path / "x",
                                                                     train__seed=7))
    check(seed, "folds differ")
    unfinished = fake_teacher_run(tmp_path / "unfinished", cfg)
    (unfinished / "fold_1" / "metrics.json").unlink()
    check(unfinished, r"fold\(s\) \[1\] have no finished 'last' adapter")
    labels = fake_teacher_run(tmp_path / "labels", cfg)
    (labels / "label_names.json").write_text(json.dumps({"label_names": ["a", "b"]}))
    check(labels, "trained on labels")
    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty", "not a teacher run")
    check(tmp_path / "missing", "run folder not found")
    # The command line: exit 2 and the message, nothing written.
    out = run_cli(["distill", "--teacher", str(other), *as_set_args(tiny_overrides(tiny_model, data / "train.csv",
                                                                                  tmp_path / "cli"))])
    assert out.returncode == 2 and "folds differ" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "cli").exists()
    assert cli.main(["distill", *as_set_args(tiny_overrides(tiny_model, data / "train.csv", tmp_path / "cli"))]) == 2
    assert "needs --teacher" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- resume, e2e


def student_overrides(model, data, out):
    # 39 labelled + 20 unlabelled training rows in fold 0 -> 8 micro-batches of 8 (one epoch); checkpoints every 3.
    return tiny_overrides(model, data / "train.csv", out, train__save_every_steps=3, lora__dropout=0.1,
                          train__num_epochs=1,
                          distill__alpha=0.3, distill__temperature=2.0)


@pytest.fixture(scope="module")
def tfidf_teacher(tiny_models, data, tmp_path_factory):
    from train.tfidf_run import main

    out = tmp_path_factory.mktemp("tfidf") / "run"
    main(tiny_config_for(tiny_models["mistral"], data / "train.csv", out), out)
    return out


def test_resume_mid_distillation_matches_uninterrupted(tiny_models, data, tfidf_teacher, tmp_path):
    from train.run import main

    model = tiny_models["mistral"]
    teacher_args = ["--teacher", str(tfidf_teacher), "--unlabelled", str(data / "unlabelled.csv")]
    base = tmp_path / "uninterrupted"
    raw = student_overrides(model, data, base)
    raw["distill"].update(teachers=[str(tfidf_teacher)], unlabelled_csv=str(data / "unlabelled.csv"))
    main(RunConfig.from_dict(raw))

    out = tmp_path / "run"
    args = ["distill", *teacher_args, *as_set_args(student_overrides(model, data, out))]
    killed = run_cli(args, launcher=kill_at_launcher(4))   # the step-6 checkpoint: mid epoch 1
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert not (out / "fold_0" / "metrics.json").exists() and (out / "teachers" / "t0_fold_0.csv").is_file()
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fold 0: resumed at epoch 0 step 6/" in resumed.stdout
    wa = load_file(out / "fold_0" / "last" / "adapter_model.safetensors")
    wb = load_file(base / "fold_0" / "last" / "adapter_model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    assert (out / "oof.csv").read_text() == (base / "oof.csv").read_text()
    assert (out / "teachers" / "t0_fold_0.csv").read_text() == (base / "teachers" / "t0_fold_0.csv").read_text()
    ma, mb = (json.loads((d / "fold_0" / "metrics.json").read_text()) for d in (out, base))
    assert ma["history"] == mb["history"] and ma["samples"] == mb["samples"] == 39 + 20
    # A changed distillation setting is refused on resume.
    raw["distill"]["alpha"] = 0.9
    raw["output_dir"] = str(out)
    with pytest.raises(InputError, match=r"distill.alpha 0.3 -> 0.9"):
        main(RunConfig.from_dict(raw), resume=True)


def test_student_of_a_real_teacher_run(tiny_models, data, tfidf_teacher, tmp_path, capsys):
    """A tiny gemma3 teacher run (folds 0-1) + the tfidf run teach a mistral student (fold 0) from the command line;
    the teacher's targets are its fold-0 adapter's predictions (as python -m infer predict computes them); the
    students benchmark's table scores the teacher on the student's rows only."""
    from benchmarks.students import main as students
    from infer.predict import predict
    from train.run import main

    teacher = tmp_path / "teacher"
    main(tiny_config_for(tiny_models["gemma3"], data / "train.csv", teacher, train__num_epochs=1, cv__folds=[0, 1]))
    out = tmp_path / "student"
    res = run_cli(["distill", "--teacher", f"{teacher},{tfidf_teacher}", "--teacher-weights", "2,1",
                   *as_set_args(tiny_overrides(tiny_models["mistral"], data / "train.csv", out,
                                               train__num_epochs=1, train__max_steps=2))])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [t["kind"] for t in summary["distill"]["teachers"]] == ["run", "tfidf"]
    assert [t["weight"] for t in summary["distill"]["teachers"]] == [2.0, 1.0]
    ids, probs, _ = read_probs(out / "teachers" / "t0_fold_0.csv")
    rows = pd.read_csv(data / "train.csv").set_index("index").loc[ids].reset_index()
    rows.to_csv(tmp_path / "rows.csv", index=False)
    predict([str(teacher / "fold_0" / "last")], tmp_path / "rows.csv", tmp_path / "teacher_probs.csv",
            progress=False)
    _, expected, _ = read_probs(tmp_path / "teacher_probs.csv")
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    assert (out / "fold_0" / "last" / "adapter_model.safetensors").is_file()

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "teacher").symlink_to(teacher)
    (runs / "student2").symlink_to(out)
    capsys.readouterr()
    assert students([str(runs), "--labels", str(data / "train.csv")]) == 0
    printed = capsys.readouterr().out
    table = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ")]
    assert [r[0] for r in table[1:]] == ["| teacher", "| student2"]
    student_rows = len(read_probs(out / "oof.csv")[0])
    assert len(read_probs(teacher / "oof.csv")[0]) > student_rows and f", {student_rows} out-of-fold rows" in printed
    assert table[1][10] == "-" and "(" in table[2][10]                   # the paired interval vs the teacher
    assert table[1][9] == "100.0%" and table[2][7] == "-"               # one fold: no nested estimate

    # The same student on fold 1, pooled with its fold-0 run: two folds, so the nested estimates appear.
    out1 = tmp_path / "student_f1"
    res = run_cli(["distill", "--teacher", f"{teacher},{tfidf_teacher}", "--teacher-weights", "2,1",
                   *as_set_args(tiny_overrides(tiny_models["mistral"], data / "train.csv", out1, train__num_epochs=1,
                                               train__max_steps=2, cv__folds=[1]))])
    assert res.returncode == 0, res.stderr[-3000:]
    runs1, pool = tmp_path / "runs1", tmp_path / "pool"
    runs1.mkdir(), pool.mkdir()
    (runs1 / "teacher").symlink_to(teacher)
    (runs1 / "student2").symlink_to(out1)
    (pool / "student2").symlink_to(out)
    assert students([str(runs1), "--labels", str(data / "train.csv"), "--pool", str(pool), "--pool-teacher",
                     str(teacher)]) == 0
    printed = capsys.readouterr().out
    table = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ")]
    both = student_rows + len(read_probs(out1 / "oof.csv")[0])
    assert len(read_probs(teacher / "oof.csv")[0]) == both and f"folds [0, 1], {both} out-of-fold rows" in printed
    assert table[2][7] != "-" and "/" in table[2][9]                       # tuned nested, as a fraction too
    pooled_meta = json.loads(meta_path(runs1 / "eval" / "student2" / "oof_pooled.csv").read_text())
    assert pooled_meta["config"] == json.loads(meta_path(out1 / "oof.csv").read_text())["config"]  # decode.fallback

    # A run on another split is not pooled.
    other = tmp_path / "other_split"
    other.mkdir()
    (other / "oof.csv").write_text((out / "oof.csv").read_text())
    folds = pd.read_csv(out / "folds.csv")
    folds["fold"] = folds["fold"].iloc[::-1].to_numpy()
    folds.to_csv(other / "folds.csv", index=False)
    from benchmarks.students import pooled
    with pytest.raises(ValueError, match="different splits"):
        pooled(out1, other, tmp_path / "pooled.csv")
