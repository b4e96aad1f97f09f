"""Outputs carry the user's data format (issue 34): probability files and submissions use the run's id column, and
the submission format is configurable (ids / names / onehot); no DLS constant is assumed in the code."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import RunConfig
from core.io import read_probs, write_probs
from infer.__main__ import main

REPO = Path(__file__).resolve().parents[2]
LABELS = ["late", "rude", "cheap"]
PROBS = np.array([[0.9, 0.1, 0.8], [0.1, 0.7, 0.1], [0.05, 0.05, 0.05]])


@pytest.fixture
def probs_file(tmp_path):
    path = tmp_path / "probs.csv"
    write_probs(path, ["r1", "r2", "r3"], PROBS, LABELS, id_column="row_id")
    return path


def test_probability_file_keeps_the_run_id_column(probs_file):
    assert list(pd.read_csv(probs_file, nrows=0).columns) == ["row_id", *LABELS]
    ids, p, names = read_probs(probs_file, LABELS)
    assert list(ids) == ["r1", "r2", "r3"] and names == LABELS and np.allclose(p, PROBS)


@pytest.mark.parametrize("fmt, columns, first", [
    ("ids", ["row_id", "target"], "0 2"),
    ("names", ["row_id", "labels"], "late cheap"),
    ("onehot", ["row_id", *LABELS], 1),
])
def test_submission_formats(probs_file, tmp_path, fmt, columns, first):
    out = tmp_path / "sub.csv"
    assert main(["submit", "--probs", str(probs_file), "--out", str(out), "--format", fmt, "--fallback", "none"]) == 0
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub.columns) == columns and list(sub["row_id"]) == ["r1", "r2", "r3"]
    assert sub.iloc[0, 1] == first
    if fmt == "onehot":
        assert sub[LABELS].to_numpy().tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("suffix, magic", [(".csv.gz", b"\x1f\x8b"), (".csv.zip", b"PK"), (".csv", b"row_id")])
def test_compressed_outputs_are_compressed_as_named(tmp_path, suffix, magic):
    # Atomic writes go through a '.tmp' file: the compression must follow the final name, or a probs.csv.gz is
    # plain text that pandas (and every reader) refuses as 'Not a gzipped file'.
    probs = tmp_path / f"probs{suffix}"
    write_probs(probs, ["r1", "r2", "r3"], PROBS, LABELS, id_column="row_id")
    assert probs.read_bytes()[:len(magic)] == magic
    ids, p, names = read_probs(probs, LABELS)
    assert list(ids) == ["r1", "r2", "r3"] and names == LABELS and np.allclose(p, PROBS)
    sub = tmp_path / f"sub{suffix}"
    assert main(["submit", "--probs", str(probs), "--out", str(sub), "--format", "names", "--fallback", "none"]) == 0
    assert sub.read_bytes()[:len(magic)] == magic
    assert list(pd.read_csv(sub, keep_default_na=False)["labels"]) == ["late cheap", "rude", ""]
    if suffix == ".csv.zip":
        import zipfile

        assert zipfile.ZipFile(sub).namelist() == ["sub.csv"]
    if suffix == ".csv.gz":  # the header names the file (not its '.tmp'), with no time: same rows, same bytes
        header = sub.read_bytes()
        assert header[3] & 0x08 and header[4:8] == b"\0\0\0\0"
        assert header[10:header.index(b"\0", 10)] == b"sub.csv"


def test_submission_format_is_a_config_key_set_in_the_dls_configs():
    assert RunConfig.from_dict({"data": {"submission_format": "onehot"}}).data.submission_format == "onehot"
    for path in sorted((REPO / "configs").glob("*/qlora.yaml")):
        assert RunConfig.from_yaml(path).data.submission_format == "ids", path


DLS = re.compile(r"trend_id_res|assesment|sample_submission|trends_description")


def test_no_dls_constant_in_the_code():
    """The DLS data's column names and files live in configs/ and the tests, not in the library."""
    hits = [f"{p.relative_to(REPO)}:{i}" for pkg in ("core", "infer") for p in sorted((REPO / pkg).rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if DLS.search(line)]
    assert hits == []
