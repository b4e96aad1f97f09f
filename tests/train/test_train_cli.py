"""Bad inputs: ``python -m train`` exits 2 with a message naming the file, row or key, and writes no output folder.
Odd but valid inputs train. The matrix runs the CLI entry point in-process (``train.__main__.main`` returns the exit
status); a representative subset runs the real ``python -m train`` in a subprocess."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml
from trainkit import ROOT, as_set_args, run_cli, tiny_overrides, write_rows

import train.__main__ as cli


def csv_variant(tmp_path, kind):
    """(path, extra overrides) for one kind of bad input; the path is what the message must name."""
    p = tmp_path / f"{kind}.csv"
    if kind == "missing_file":
        return tmp_path / "no_such_train.csv", {}
    if kind == "missing_column":
        df = pd.read_csv(write_rows(p, 30)).rename(columns={"text": "review_text"})
        df.to_csv(p, index=False)
        return p, {}
    if kind == "label_2":
        return write_rows(p, 30, trend_id_res7=lambda df: np.where(np.arange(len(df)) == 4, 2,
                                                                   df["trend_id_res7"])), {}
    if kind == "label_text":
        return write_rows(p, 30, trend_id_res0=lambda df: ["yes" if i == 9 else v
                                                           for i, v in enumerate(df["trend_id_res0"])]), {}
    if kind == "label_half":
        return write_rows(p, 30, trend_id_res5=lambda df: np.where(np.arange(len(df)) == 0, 0.5,
                                                                   df["trend_id_res5"])), {}
    if kind == "label_missing":
        return write_rows(p, 30, trend_id_res19=lambda df: np.where(np.arange(len(df)) == 2, np.nan,
                                                                    df["trend_id_res19"])), {}
    if kind == "header_only":
        return write_rows(p, 0), {}
    if kind == "zero_bytes":
        p.write_text("")
        return p, {}
    if kind == "duplicate_id":
        return write_rows(p, 30, index=lambda df: [1] + list(range(1, len(df)))), {}
    raise ValueError(kind)


# kind -> fragments the error message must contain ({path} is the CSV's path)
DATA_CASES = {
    "missing_file": ["{path}", "not found"],
    "missing_column": ["{path}", "missing column", "'text'"],
    "label_2": ["{path}", "row 6", "'trend_id_res7'", "not 0 or 1"],
    "label_text": ["{path}", "row 11", "'trend_id_res0'", "'yes'"],
    "label_half": ["{path}", "row 2", "'trend_id_res5'", "0.5"],
    "label_missing": ["{path}", "row 4", "'trend_id_res19'"],
    "header_only": ["{path}", "empty"],
    "zero_bytes": ["{path}"],
    "duplicate_id": ["{path}", "duplicate id 1", "row 3"],
}


def run_inprocess(raw, capsys, extra_args=()):
    code = cli.main([*as_set_args(raw), *extra_args])
    captured = capsys.readouterr()
    return code, captured.err


def check_failure(code, err, out_dir, fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err                     # one clear line (progress bars may precede it)
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    assert not out_dir.exists(), f"{out_dir} was created"


@pytest.mark.parametrize("kind", sorted(DATA_CASES))
def test_bad_data(tiny_model, tmp_path, capsys, kind):
    path, extra = csv_variant(tmp_path, kind)
    out = tmp_path / "out"
    code, err = run_inprocess(tiny_overrides(tiny_model, path, out, **extra), capsys)
    check_failure(code, err, out, [f.format(path=path) for f in DATA_CASES[kind]])


# (override dict via tiny_overrides' section__key keywords, fragments)
CONFIG_CASES = {
    "misspelled_id_column": ({"data__id_column": "idx"}, ["missing column", "'idx'", "data.id_column"]),
    "template_column": ({"data__text_template": "{txt}"}, ["missing column", "'txt'", "data.text_template"]),
    "label_columns": ({"data__label_columns": ["trend_id_res0", "trend_id_rs1"]}, ["'trend_id_rs1'"]),
    "label_prefix": ({"data__label_prefix": "trend_res"}, ["'trend_res'", "data.label_prefix"]),
    "num_labels": ({"model__num_labels": 19}, ["model.num_labels=19", "20 label columns"]),
    "model_path": ({"model__name_or_path": "/no/such/model/dir"}, ["model.name_or_path", "/no/such/model/dir"]),
    "hub_id_not_cached": ({"model__name_or_path": "nobody-xyz/not-a-model"}, ["nobody-xyz/not-a-model"]),
    "label_names_csv": ({"data__label_names_csv": "/no/trends.csv"}, ["/no/trends.csv"]),
    "too_few_rows": ({"cv__n_folds": 40, "cv__folds": [0]}, ["cv.n_folds"]),
    "target_modules": ({"lora__target_modules": ["q_proj", "qkv_proj"]}, ["lora.target_modules", "qkv_proj"]),
    "layers_from": ({"lora__layers_from": 7}, ["lora.layers_from=7"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values(tiny_model, tmp_path, capsys, case):
    extra, fragments = CONFIG_CASES[case]
    train_csv = write_rows(tmp_path / "train.csv", 30)
    out = tmp_path / "out"
    code, err = run_inprocess(tiny_overrides(tiny_model, train_csv, out, **extra), capsys)
    check_failure(code, err, out, fragments)


@pytest.mark.parametrize("args, fragments", [
    (["--set", "train.lrr=1"], ["unknown config key", "train.lrr"]),
    (["--set", "trainn.lr=1"], ["unknown config key", "trainn"]),
    (["--set", "train.num_epochs=two"], ["train.num_epochs", "integer"]),
    (["--set", "loss.name=ce"], ["loss.name", "bce"]),
    (["--set", "cv.folds=[9]"], ["cv.folds"]),
    (["--set", "train.lr"], ["train.lr", "key=value"]),
    (["--config", "/no/such/config.yaml"], ["/no/such/config.yaml"]),
    (["--resume", "elsewhere"], ["--resume", "hub:"]),
])
def test_bad_config_keys(tmp_path, capsys, args, fragments):
    out = tmp_path / "out"
    code = cli.main(["--set", f"output_dir={out}", *args])
    check_failure(code, capsys.readouterr().err, out, fragments)


def test_unknown_key_in_config_file(tmp_path, capsys, tiny_model):
    raw = yaml.safe_load((ROOT / "configs/gemma-3-270m/qlora.yaml").read_text())
    raw["train"]["epochs"] = 3                                    # num_epochs misspelled
    cfg = tmp_path / "my.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    code = cli.main(["--config", str(cfg), "--set", f"output_dir={out}"])
    check_failure(code, capsys.readouterr().err, out, [str(cfg), "train.epochs"])


def test_print_config(capsys):
    assert cli.main(["--config", str(ROOT / "configs/mistral-7b/qlora.yaml"), "--set", "train.lr=1e-4",
                     "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0001" in out and "mistralai/Mistral-7B-v0.1" in out


def test_training_failure_exits_1(tiny_model, small_csv, tmp_path):
    """A non-finite loss stops training with exit status 1 and a hint (not a traceback)."""
    out = tmp_path / "out"
    raw = tiny_overrides(tiny_model, small_csv, out, train__lr=1e30, train__max_grad_norm=1e30,
                         train__scheduler="constant")
    res = run_cli(as_set_args(raw))
    assert res.returncode == 1, res.stderr[-3000:]
    assert re.search(r"error: fold 0: loss is (nan|inf) at optimizer step \d", res.stderr), res.stderr[-2000:]
    assert "train.lr" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("kind", ["missing_file", "label_2", "header_only"])
def test_subprocess_bad_data(tiny_model, tmp_path, kind):
    path, extra = csv_variant(tmp_path, kind)
    out = tmp_path / "out"
    res = run_cli(as_set_args(tiny_overrides(tiny_model, path, out, **extra)))
    check_failure(res.returncode, res.stderr, out, [f.format(path=path) for f in DATA_CASES[kind]])


@pytest.mark.parametrize("extra, args, fragments", [
    ({"model__num_labels": 5}, [], ["model.num_labels=5"]),
    ({"model__name_or_path": "/no/such/model"}, [], ["/no/such/model"]),
    ({}, ["--set", "train.bogus=1"], ["train.bogus"]),
])
def test_subprocess_bad_config(tiny_model, small_csv, tmp_path, extra, args, fragments):
    out = tmp_path / "out"
    res = run_cli([*as_set_args(tiny_overrides(tiny_model, small_csv, out, **extra)), *args])
    check_failure(res.returncode, res.stderr, out, fragments)


def test_fixing_the_input_then_rerunning_works(tiny_model, small_csv, tmp_path, capsys):
    """An input error found after the folder was made (LoRA targets) leaves nothing behind: the fixed command runs."""
    out = tmp_path / "out"
    bad = tiny_overrides(tiny_model, small_csv, out, lora__target_modules=["q_prj"], train__max_steps=1,
                         train__num_epochs=1)
    assert cli.main(as_set_args(bad)) == 2 and not out.exists()
    good = tiny_overrides(tiny_model, small_csv, out, train__max_steps=1, train__num_epochs=1)
    assert cli.main(as_set_args(good)) == 0
    assert (out / "summary.json").is_file()
    # Running it again without --resume refuses to mix runs; with --resume it is a no-op.
    capsys.readouterr()
    assert cli.main(as_set_args(good)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main([*as_set_args(good), "--resume"]) == 0


def test_help_builds_every_parser_without_torch_or_sklearn():
    """`python -m train -h` and each command's -h are instant: building the parsers imports no heavy library (the
    commands import their library when they run; the method docs are read from source by core.cli.module_doc)."""
    import subprocess
    import sys

    code = ("import sys; from train.__main__ import build_parser; p = build_parser(); "
            "p._subparsers._group_actions[0].choices['prune'].format_help(); "
            "print(sorted(m for m in ('torch', 'sklearn', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "Structured pruning of a decoder" in help_text  # the library's docstring, read without importing it
