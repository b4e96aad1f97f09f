"""A thresholds file is validated when it is read (issue 34): thresholds in [0, 1], step > 0, offsets bounded."""

from __future__ import annotations

import json

import pytest

from core.decoding import read_thresholds
from core.errors import InputError
from core.thresholds import MAX_CLASS_OFFSET, ThresholdSpec

LABELS = [f"c{i}" for i in range(4)]
GOOD = ThresholdSpec(tuple(LABELS), start=0.5, stop=0.2, step=0.05, fallback=None).to_dict()

BAD = [
    ({"start": 1.5}, "start must be in"),
    ({"stop": -0.2}, "stop must be in"),
    ({"start": -0.1, "stop": -0.3}, "must be in"),
    ({"step": 0}, "step must be > 0"),
    ({"step": -0.05}, "step must be > 0"),
    ({"step": 1e-9}, "thresholds from"),
    ({"start": float("nan")}, "finite"),
    ({"step": float("inf")}, "finite"),
    ({"start": "0.5"}, "finite number"),
    ({"start": True}, "finite number"),
    ({"stop": 0.6}, "must be <= start"),
    ({"class_offsets": [2.0, 0, 0, 0]}, "class_offsets[0]"),
    ({"class_offsets": [0, 0, 0, -0.9]}, "class_offsets[3]"),
    ({"class_offsets": [0, 0, 0, float("nan")]}, "class_offsets[3]"),
    ({"class_offsets": [0, 0, 0]}, "3 values for 4 labels"),
    ({"class_offsets": ["x", 0, 0, 0]}, "invalid thresholds"),
]


@pytest.mark.parametrize("change, says", BAD, ids=range(len(BAD)))
def test_out_of_range_thresholds_file_is_refused(tmp_path, change, says):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(InputError, match="invalid thresholds") as e:
        read_thresholds(path)
    assert says in str(e.value) and str(path) in str(e.value)


def test_in_range_file_reads(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({**GOOD, "class_offsets": [MAX_CLASS_OFFSET, -MAX_CLASS_OFFSET, 0, 0.1]}))
    assert read_thresholds(path).class_offsets == (MAX_CLASS_OFFSET, -MAX_CLASS_OFFSET, 0, 0.1)
    path.write_text(json.dumps({**GOOD, "start": 1.0, "stop": 0.0, "step": 0.01}))
    assert len(read_thresholds(path).steps) == 101


def test_submit_refuses_an_out_of_range_file(tmp_path, capsys):
    import numpy as np

    from core.io import write_probs
    from infer.__main__ import main

    probs = tmp_path / "probs.csv"
    write_probs(probs, np.arange(3), np.full((3, 4), 0.3), LABELS)
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({**GOOD, "start": 1.5}))
    assert main(["submit", "--probs", str(probs), "--out", str(tmp_path / "s.csv"), "--thresholds", str(path)]) == 2
    err = capsys.readouterr().err
    assert "start must be in [0, 1]" in err and "Traceback" not in err and not (tmp_path / "s.csv").exists()
