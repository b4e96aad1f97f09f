"""Quiet by default (issue 34, item 14): the known-harmless library messages are filtered at their source
(core/quiet.py, installed by core.cli.setup_logging), and ``--verbose`` shows them again."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE_DATA, SAMPLE_DECODE

from core.cli import setup_logging
from core.quiet import fresh_head_report, libraries_verbose

REPO = Path(__file__).resolve().parents[2]
NOISE = ("LOAD REPORT", "is_gradient_checkpointing", "torch_dtype")

REPORT = ("[transformers] \x1b[1mGemma3TextForSequenceClassification LOAD REPORT\x1b[0m from: /m\n"
          "Key          | Status  | \n-------------+---------+-\n{rows}\n\nNotes:\n"
          "- MISSING:\tthose params were newly initialized because missing from the checkpoint.")


@pytest.fixture
def restore_quiet():
    yield
    setup_logging()


def test_only_a_report_of_the_fresh_head_is_dropped():
    assert fresh_head_report(REPORT.format(rows="score.weight | MISSING | "))
    assert fresh_head_report(REPORT.format(rows="score.weight | MISSING | \nscore.bias   | MISSING | "))
    # anything else in the report is news and still shows
    assert not fresh_head_report(REPORT.format(rows="score.weight | MISSING | \nmodel.norm.weight | MISSING | "))
    assert not fresh_head_report(REPORT.format(rows="score.weight | UNEXPECTED | "))
    assert not fresh_head_report(REPORT.format(rows="lm_head.weight | MISMATCH | ckpt: [2] vs model:[3]"))
    assert not fresh_head_report("some other warning | with | bars")


def test_setup_logging_filters_at_the_source_and_verbose_shows_again(restore_quiet, caplog):
    head = REPORT.format(rows="score.weight | MISSING | ")
    other = REPORT.format(rows="model.norm.weight | MISSING | ")

    def emitted():
        caplog.clear()
        logging.getLogger("transformers.modeling_utils").warning(head)
        logging.getLogger("transformers.modeling_utils").warning(other)
        logging.getLogger("transformers.configuration_utils").warning("`torch_dtype` is deprecated! Use `dtype`!")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # pytest's own filter, as a plain run has it
            setup_logging(libraries_verbose())  # our filters go back in front
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        return [r.getMessage() for r in caplog.records], [str(w.message) for w in caught]

    setup_logging()
    records, caught = emitted()
    assert records == [other] and caught == []
    setup_logging(verbose=True)
    records, caught = emitted()
    assert len(records) == 3 and len(caught) == 1
    setup_logging()  # and back: idempotent
    assert emitted() == ([other], [])


SCRIPT = r"""
import sys
from train.__main__ import main
assert main(sys.argv[2:]) == 0
from transformers import AutoConfig
AutoConfig.from_pretrained(sys.argv[1]).torch_dtype  # the deprecated property (transformers' warning_once)
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_training_run_on_a_tiny_model_prints_no_library_noise(tiny_model, small_csv, tmp_path, verbose):
    cfg = {"model": {"name_or_path": str(tiny_model), "attn_implementation": "eager"},
           "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "decode": dict(SAMPLE_DECODE),
           "data": {**SAMPLE_DATA, "train_csv": str(small_csv),
                    "label_names_csv": str(REPO / "data" / "sample_trends.csv"), "max_length": 64},
           "train": {"num_epochs": 1, "max_steps": 1, "micro_batch_size": 8, "eval_batch_size": 32,
                     "save_every_steps": 0},
           "cv": {"n_folds": 2, "folds": [0]}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(tmp_path / "cfg.yaml"), *(["--verbose"] if verbose else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model), *argv], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    if verbose:
        assert all(s in r.stderr for s in NOISE), r.stderr[-4000:]
    else:
        assert not [s for s in NOISE if s in r.stderr], r.stderr[-4000:]
        assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr[-4000:]
