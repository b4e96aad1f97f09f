"""``python -m train pipeline``: the shipped pipeline configs and their commands (every command the pipeline runs is
accepted by the toolkit's own parsers), then the tiny pipeline (configs/tiny/pipeline.yaml on a tiny random-init
model) run for real: every step's output and figure, a second invocation that skips everything in well under a
second of work, stale outputs redone or refused, a CV killed mid-fold and resumed, a failing step's exit status and
message."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from trainkit import kill_at_launcher

from core.errors import ConfigError, InputError
from train.pipeline import PipelineConfig, decide, plan, read_state, run_pipeline

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = sorted((ROOT / "configs").rglob("pipeline.yaml"))


def tiny_pipeline(tmp_path: Path, model: Path, train_csv: Path, name: str = "pipeline.yaml", **changes) -> Path:
    """configs/tiny/pipeline.yaml with the tiny model appended to its overrides and ``section__key`` changes."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny" / "pipeline.yaml").read_text())
    raw["overrides"].append(f"model.name_or_path={model}")
    raw["train_csv"] = str(train_csv)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from train.__main__ import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def table(out: str) -> dict[str, tuple[str, str]]:
    """{step: (status, figure)} from the table the command prints last."""
    lines = out[out.rindex("\nstep "):].strip().splitlines()[1:]
    rows = {}
    for line in lines:
        for status in ("ran", "skipped", "failed", "not run"):
            head, sep, tail = line.partition(f"  {status}  ")
            if sep:
                rows[head.strip()] = (status, tail.strip().split("  ", 1)[-1].strip())
                break
    return rows


# ------------------------------------------------------------------------------------------ config and plan (fast)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_pipelines_load_and_plan_commands_the_parsers_take(path, tmp_path):
    from infer.__main__ import build_parser as infer_parser
    from train.__main__ import build_parser as train_parser

    cfg = PipelineConfig.from_yaml(path, ["test_csv=data/sample_test.csv"])
    (tmp_path / "again.yaml").write_text(cfg.to_yaml())
    assert PipelineConfig.from_yaml(tmp_path / "again.yaml") == cfg  # pipeline_config.yaml reads back
    steps = plan(cfg, tmp_path / "run")
    for step in steps:
        argv = step.argv[step.argv.index("-m", 1) + 1:] if step.argv[1] == "torch.distributed.run" else step.argv[1:]
        module, args = argv[0], argv[1:]
        parser = train_parser() if module == "train" else infer_parser()
        parser.parse_args(args if module == "infer" or args[0] in {"trim-vocab", "dapt", "tfidf", "merge"}
                          else ["cv", *args])  # no command name: the CV, as python -m train --config X
    if path.parent.name == "gemma-3-270m":  # the shipped steps of RESULTS.md's best pipeline
        run = tmp_path / "run"
        assert [s.name for s in steps] == ["trim-vocab", "dapt", "cv", "cv-cue", "predict cv+final",
                                           "predict cv-cue+final", "blend", "tune", "submit"]
        cv, cue = steps[2].argv, steps[3].argv
        assert f"model.name_or_path={run / 'base'}" in cv
        assert f"lora.init_adapter={run / 'dapt'}" in cv and "--final" in cv
        assert steps[1].argv[steps[1].argv.index("--config") + 1] == "configs/gemma-3-270m/dapt.yaml"
        # Two prompts, the second ending in a cue, on the same folds from the same DAPT adapter, blended (weights
        # tuned on their OOF); no TF-IDF (it did not hold outside the folds). Each is predicted by its fold models
        # and its final model, a half each; the cascade is tuned on the blend's OOF.
        assert [a for a in cue if a not in cv] == ["cv.seed=42", next(a for a in cue if a.startswith(
            "data.text_template=") and a.endswith('{text}\\n\\nTrends:"')), f"output_dir={run / 'cv-cue'}"]
        blend, tune, submit, pred = steps[6].argv, steps[7].argv, steps[8].argv, steps[5].argv
        assert blend[blend.index("--oof") + 1] == f"{run / 'cv' / 'oof.csv'},{run / 'cv-cue' / 'oof.csv'}"
        assert blend[blend.index("--probs") + 1] == f"{run / 'probs' / 'cv+final.csv'},{run / 'probs' / 'cv-cue+final.csv'}"
        assert tune[tune.index("--oof") + 1] == str(run / "blend_oof.csv")
        assert tune[tune.index("--strategy") + 1] == "cascade"
        assert pred[pred.index("--adapter") + 1] == f"{run / 'cv-cue'},{run / 'cv-cue' / 'final' / 'last'}"
        assert submit[submit.index("--probs") + 1] == str(run / "blend.csv")
        # The CV at r 64 / 3 epochs from a DAPT adapter of the same LoRA shape (issue 38's levers together).
        assert {"lora.r=64", "lora.alpha=128", "train.num_epochs=3"} <= set(cv)
        assert {"lora.r=64", "lora.alpha=128"} <= set(steps[1].argv)
        # label_names_csv reaches the CVs (the head starts from the names), and TF-IDF when it runs, as train_csv does.
        named = plan(PipelineConfig.from_yaml(path, ["test_csv=t.csv", "label_names_csv=my labels.csv"]), tmp_path)
        assert [s.name for s in named if "data.label_names_csv=my labels.csv" in s.argv] == ["cv", "cv-cue"]
        blended = plan(PipelineConfig.from_yaml(path, ["test_csv=t.csv", "label_names_csv=my labels.csv",
                                                       "tfidf.enabled=true"]), tmp_path)
        assert [s.name for s in blended if "data.label_names_csv=my labels.csv" in s.argv] == ["cv", "cv-cue",
                                                                                               "tfidf"]
        assert [s.name for s in blended][6:8] == ["tfidf", "blend"]
        assert "--tune-decoding" in blended[7].argv
        # predict.model=folds: the fold models alone (the final model still trains while cv.final is on)
        folds = plan(PipelineConfig.from_yaml(path, ["test_csv=t.csv", "predict.model=folds"]), tmp_path)
        assert [s.name for s in folds][4] == "predict cv" and folds[4].needs == ("cv",)
        assert folds[4].argv[folds[4].argv.index("--adapter") + 1] == f"{tmp_path}/cv"


def test_seeds_share_the_first_split_and_each_is_a_model_of_the_blend(tmp_path):
    cfg = PipelineConfig.from_yaml(ROOT / "configs" / "gemma-3-270m" / "pipeline.yaml",
                                   ["test_csv=t.csv", "cv.seeds=[42,7]", "cv.variants={}", "trim_vocab.enabled=false",
                                    "dapt.enabled=false", "tfidf.enabled=true", "cv.final=false",
                                    "predict.model=folds"])
    steps = {s.name: s for s in plan(cfg, tmp_path)}
    assert [n for n in steps if n.startswith(("cv", "predict"))] == ["cv", "cv-seed7", "predict cv",
                                                                     "predict cv-seed7"]
    assert "train.seed=7" in steps["cv-seed7"].argv and "cv.seed=42" in steps["cv-seed7"].argv
    assert not any(a.startswith(("train.seed", "cv.seed")) for a in steps["cv"].argv)  # the config's own seed
    blend = steps["blend"].argv
    assert blend[blend.index("--oof") + 1] == f"{tmp_path}/cv/oof.csv,{tmp_path}/cv-seed7/oof.csv,{tmp_path}/tfidf/oof.csv"
    assert set(steps["blend"].needs) >= {"cv", "cv-seed7", "predict cv", "predict cv-seed7", "tfidf"}
    # A merged adapter stands for every seed: its test file takes each seed's place in the blend.
    merged = {s.name: s for s in plan(PipelineConfig.from_yaml(None, [
        "test_csv=t.csv", "cv.seeds=[1,2]", "merge.enabled=true", "predict.model=merged"]), tmp_path)}
    assert merged["merge"].argv[3:7] == ["--run", f"{tmp_path}/cv", "--run", f"{tmp_path}/cv-seed2"]
    assert [n for n in merged if n.startswith("predict")] == ["predict merged"]
    probs = merged["blend"].argv[merged["blend"].argv.index("--probs") + 1]
    assert probs == f"{tmp_path}/probs/merged.csv,{tmp_path}/probs/merged.csv"


def test_a_variant_is_a_model_of_the_blend_on_the_first_cvs_folds(tmp_path):
    """``cv.variants``: one more CV per name, on top of the first CV's overrides (DAPT adapter, seed), its split
    pinned, predicted with its own final model and blended; a variant that does not load is named before any step."""
    cue = 'data.text_template="Review: {text}\\n\\nTrends:"'
    cfg = PipelineConfig.from_yaml(ROOT / "configs" / "gemma-3-270m" / "pipeline.yaml",
                                   ["test_csv=t.csv", f"cv.variants={{cue: ['{cue}']}}", "trim_vocab.enabled=false"])
    steps = {s.name: s for s in plan(cfg, tmp_path)}
    assert [n for n in steps if n.startswith(("cv", "predict"))] == ["cv", "cv-cue", "predict cv+final",
                                                                     "predict cv-cue+final"]
    argv = steps["cv-cue"].argv
    assert argv[-7:] == ["--set", "cv.seed=42", "--set", cue, "--set", f"output_dir={tmp_path}/cv-cue", "--final"]
    assert f"lora.init_adapter={tmp_path}/dapt" in argv and steps["cv-cue"].needs == ("dapt",)
    assert "cv.seed=42" not in steps["cv"].argv
    predict = steps["predict cv-cue+final"].argv
    assert predict[predict.index("--adapter") + 1] == f"{tmp_path}/cv-cue,{tmp_path}/cv-cue/final/last"
    blend = steps["blend"].argv
    assert blend[blend.index("--oof") + 1] == f"{tmp_path}/cv/oof.csv,{tmp_path}/cv-cue/oof.csv"
    assert blend[blend.index("--folds") + 1] == f"{tmp_path}/cv/folds.csv"
    assert set(steps["blend"].needs) >= {"cv", "cv-cue", "predict cv+final", "predict cv-cue+final"}
    # on top of a seed other than the config's: the variant keeps it (and the pin once)
    seeded = {s.name: s for s in plan(PipelineConfig.from_yaml(None, [
        "cv.seeds=[7]", "cv.variants={r8: [lora.r=8]}"]), tmp_path)}
    assert [a for a in seeded["cv-r8"].argv if a.startswith(("train.seed", "cv.seed", "lora.r"))] == [
        "train.seed=7", "cv.seed=42", "lora.r=8"]
    with pytest.raises(ConfigError, match=r"cv.variants.x: .*unknown config key\(s\): train.lrr"):
        plan(PipelineConfig.from_yaml(None, ["cv.variants={x: [train.lrr=1]}"]), tmp_path)


@pytest.mark.parametrize("sets, match", [
    (["trian.enabled=true"], r"unknown config key\(s\): trian"),
    (["tfidf.enabld=true"], r"unknown config key\(s\): tfidf.enabld"),
    (["tune.strategy=best"], r"tune.strategy must be one of \['cascade', 'sets'\]"),
    (["predict.model=final"], "predict.model=final needs cv.final=true"),
    (["predict.model=folds+final"], "predict.model=folds\\+final needs cv.final=true"),
    (["predict.model=merged"], "predict.model=merged needs merge.enabled=true"),
    (["runs=[a]", "dapt.enabled=true", "dapt.corpus=[c.csv]"], "runs .* leaves nothing to train"),
    (["dapt.enabled=true"], "dapt.enabled needs dapt.corpus or a test CSV"),
    (["cv.seeds=[1,1]", "tfidf.C=0"], r"cv.seeds must be distinct.*; tfidf.C must be > 0"),
    (["cv.variants=[x]"], r"cv.variants must be a mapping"),
    (["cv.variants={x: lora.r=8}"], r"cv.variants.x must be a list"),
    (["cv.variants={seed7: [train.seed=7], a/b: [lora.r=8]}"], r"name 'seed7' .*; .*name 'a/b'"),
    (["cv.variants={x: [cv.n_folds=3, train.lr]}"], r"cv.n_folds may not change.*; cv.variants.x: 'train.lr' is not"),
    (["runs=[a]", "cv.variants={x: [lora.r=8]}"], "runs .* leaves nothing to train"),
])
def test_bad_pipeline_config_is_named(sets, match):
    with pytest.raises(ConfigError, match=match):
        PipelineConfig.from_yaml(None, sets)


def test_bad_config_exits_2_before_anything_is_written(tmp_path, capsys):
    rc, _, err = run_main(["pipeline", "--set", "cv.seeds=[1,1]", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "cv.seeds must be distinct" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- the real thing


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline_data")
    train, test = folder / "train60.csv", folder / "test20.csv"
    pd.read_csv(ROOT / "data" / "sample_train.csv").head(60).to_csv(train, index=False)
    pd.read_csv(ROOT / "data" / "sample_test.csv").head(20).to_csv(test, index=False)
    return train, test


@dataclass
class Full:
    model: Path
    train: Path
    test: Path
    config: Path
    out: Path
    res: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_model, data) -> Full:
    """The tiny pipeline, every step (trim-vocab .. submit, with the final model and the merged adapter), run
    through the command line once."""
    train, test = data
    work = tmp_path_factory.mktemp("pipeline")
    config = tiny_pipeline(work, tiny_model, train)
    out = work / "run"
    res = subprocess.run([sys.executable, "-m", "train", "pipeline", "--config", str(config), "--test", str(test),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    return Full(tiny_model, train, test, config, out, res)


def test_every_step_runs_and_reports_its_figure(full):
    out, res, test = full.out, full.res, full.test
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = table(res.stdout)
    assert list(rows) == ["trim-vocab", "dapt", "cv", "merge", "predict cv", "tfidf", "blend", "tune", "submit"]
    assert all(status == "ran" for status, _ in rows.values()), rows
    summary = json.loads((out / "cv" / "summary.json").read_text())
    assert f"exact match {summary['oof_metrics']['cascade/exact_match']:.4f} cascade" in rows["cv"][1]
    assert (out / "cv" / "final" / "last" / "adapter_config.json").is_file()
    assert (out / "merged" / "adapter_config.json").is_file()
    assert summary["config"]["model"]["name_or_path"] == str(out / "base")
    assert summary["config"]["lora"]["init_adapter"] == str(out / "dapt")
    assert rows["predict cv"][1].startswith("20 rows predicted")
    assert rows["blend"][1].startswith("nested exact match") and "tuned cascade" in rows["blend"][1]
    assert rows["tune"][1].startswith("nested exact_match")
    assert rows["submit"][1] == f"20 rows -> {out / 'submission.csv'}"
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub["index"]) == list(pd.read_csv(test)["index"])
    blend_meta = json.loads((out / "blend.csv.meta.json").read_text())
    assert blend_meta["inputs"] == [str(out / "probs" / "cv.csv"), str(out / "tfidf" / "test_probs.csv")]
    # Each step's output streamed to the terminal and kept in its log, beginning with its command.
    log = (out / "logs" / "cv.log").read_text()
    assert "-m train --config configs/gemma-3-270m/qlora.yaml" in log and "out-of-fold (0, 1)" in log
    assert "out-of-fold (0, 1)" in res.stdout
    state = json.loads((out / "pipeline.json").read_text())
    assert state["steps"]["cv"]["inputs"] == {"trim-vocab": state["steps"]["trim-vocab"]["finished"],
                                              "dapt": state["steps"]["dapt"]["finished"]}
    assert [r["status"] for r in state["last"]] == ["ran"] * 9


def test_second_invocation_skips_every_step(full, capsys):
    out, res = full.out, full.res
    assert res.returncode == 0
    logs = {p: p.stat().st_size for p in (out / "logs").iterdir()}
    t0 = time.perf_counter()
    rc, stdout, _ = run_main(["pipeline", "--config", str(full.config), "--test", str(full.test), "--out", str(out)],
                             capsys)
    seconds = time.perf_counter() - t0
    assert rc == 0
    rows = table(stdout)
    assert {status for status, _ in rows.values()} == {"skipped"}, rows
    assert rows["cv"][1] == table(res.stdout)["cv"][1]  # the figure read back from the output
    assert {p: p.stat().st_size for p in (out / "logs").iterdir()} == logs  # no command ran
    assert seconds < 5, seconds  # no subprocess: a few JSON files read


def test_a_changed_step_is_redone_with_what_reads_it(full, tmp_path):
    assert full.res.returncode == 0

    def actions(**changes):
        cfg = PipelineConfig.from_yaml(tiny_pipeline(tmp_path, full.model, full.train, **changes),
                                       [f"test_csv={full.test}"])
        return {a.step.name: a.do for a in decide(plan(cfg, full.out), read_state(full.out))}

    assert set(actions().values()) == {"skip"}
    # Another tune: tune and what reads it (submit) run again; the rest is kept.
    got = actions(tune__n_trials=7)
    assert {n for n, do in got.items() if do != "skip"} == {"tune", "submit"} and got["tune"] == "rerun"
    # Another TF-IDF: its folder is replaced, the blend and everything after it redone.
    got = actions(tfidf__C=2.0)
    assert got["tfidf"] == "replace" and [got[n] for n in ("blend", "tune", "submit")] == ["rerun"] * 3
    assert got["cv"] == "skip"
    # More folds of the same CV: --resume (the CV's own checks decide); predictions and merge after it redone.
    got = actions(overrides=yaml.safe_load(full.config.read_text())["overrides"] + ["cv.folds=[0,1]"])
    assert got["cv"] == "resume" and got["merge"] == "replace" and got["predict cv"] == "rerun"
    # Another DAPT: a finished adapter and the CV trained from it are never thrown away: refused, both named.
    with pytest.raises(InputError, match=r"(?s)step dapt: .*/dapt is complete but was made by another command.*"
                                         r"delete .*/dapt to redo it.*step cv: .*/cv is complete but was made "
                                         r"before dapt was redone"):
        actions(dapt__eval_rows=4)


def test_killed_cv_resumes_and_a_failing_step_names_itself(tmp_path, tiny_model, data, capsys):
    """A CV killed after its first checkpoint: the next invocation resumes it (--resume); a step that then fails
    stops the pipeline with exit 1 naming the step and its log; fixed, the pipeline goes on from there."""
    train, test = data
    out = tmp_path / "run"
    small = {"trim_vocab__enabled": False, "dapt__enabled": False, "cv__final": False, "merge__enabled": False,
             "tfidf__enabled": False}
    cfg = PipelineConfig.from_yaml(tiny_pipeline(tmp_path, tiny_model, train, **small), [f"test_csv={test}"])

    def killer(step):  # python tests/train/kill_at.py 1 train ...: the CV dies after its first checkpoint
        return kill_at_launcher(1) + step.argv[1:] if step.name == "cv" else [sys.executable, *step.argv]

    _, results = run_pipeline(cfg, out, launcher=killer)
    assert [(r.name, r.status) for r in results] == [("cv", "failed"), ("predict cv", "not run"),
                                                     ("tune", "not run"), ("submit", "not run")]
    assert results[0].figure == "exit status 137" and (out / "cv" / "fold_0" / "checkpoint").is_dir()
    assert not (out / "cv" / "summary.json").exists()

    bad = tiny_pipeline(tmp_path, tiny_model, train, name="bad.yaml", predict__base_model=str(tmp_path / "nowhere"),
                        **small)
    rc, stdout, err = run_main(["pipeline", "--config", str(bad), "--test", str(test), "--out", str(out)], capsys)
    assert rc == 1
    log = out / "logs" / "predict-cv.log"
    assert f"error: step predict cv failed (exit status 2); its log: {log}" in err
    assert "--resume" in (out / "logs" / "cv.log").read_text().split("===")[-1]  # the second attempt resumed
    rows = table(stdout)
    assert [rows[n][0] for n in ("cv", "predict cv", "tune", "submit")] == ["ran", "failed", "not run", "not run"]
    assert "nowhere" in log.read_text()

    good = tiny_pipeline(tmp_path, tiny_model, train, name="good.yaml", **small)
    rc, stdout, _ = run_main(["pipeline", "--config", str(good), "--test", str(test), "--out", str(out)], capsys)
    rows = table(stdout)
    assert rc == 0 and [rows[n][0] for n in ("cv", "predict cv", "tune", "submit")] == ["skipped", "ran", "ran", "ran"]
    assert len(pd.read_csv(out / "submission.csv")) == 20


def test_dry_run_says_what_would_run(tmp_path, tiny_model, data, capsys):
    train, test = data
    config = tiny_pipeline(tmp_path, tiny_model, train)
    rc, stdout, _ = run_main(["pipeline", "--config", str(config), "--test", str(test), "--out",
                              str(tmp_path / "run"), "--dry-run"], capsys)
    assert rc == 0 and not (tmp_path / "run").exists()
    assert "[3/9] cv: run\n    python -m train --config configs/gemma-3-270m/qlora.yaml" in stdout
