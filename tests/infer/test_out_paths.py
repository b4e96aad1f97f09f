"""Every infer CLI checks its output paths before it loads a model or reads much (issue 34): a clear exit 2 naming
the path, no traceback."""

from __future__ import annotations

import pytest

from infer.__main__ import main


@pytest.fixture
def blocked(tmp_path, monkeypatch):
    """A file where a folder is expected, and model loading that fails the test if reached."""
    import infer.predict

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(infer.predict, "load_refs", no_load)
    f = tmp_path / "a_file"
    f.write_text("x")
    return tmp_path, f


CASES = [
    (["predict", "--adapter", "A", "--input", "in.csv", "--out", "{file}/probs.csv"], "--out"),
    (["predict", "--adapter", "A", "--input", "in.csv", "--out", "{file}/deeper/probs.csv"], "--out"),
    (["predict", "--adapter", "A", "--input", "in.csv", "--out", "{dir}"], "is a folder"),
    (["submit", "--probs", "p.csv", "--out", "{file}/sub.csv"], "--out"),
    (["submit", "--probs", "p.csv", "--out", "{dir}"], "is a folder"),
    (["tune", "--oof", "o.csv", "--labels", "l.csv", "--out", "{file}/t.json"], "--out"),
    (["tune", "--oof", "o.csv", "--labels", "l.csv", "--out", "{dir}"], "is a folder"),
    (["blend", "--probs", "a.csv,b.csv", "--oof", "a.csv,b.csv", "--labels", "l.csv", "--out", "{file}/b.csv"],
     "--out"),
    (["blend", "--probs", "a.csv,b.csv", "--oof", "a.csv,b.csv", "--labels", "l.csv", "--out", "b.csv",
      "--out-oof", "{dir}"], "--out-oof"),
    (["evaluate", "--probs", "p.csv", "--labels", "l.csv", "--out-dir", "{file}"], "--out-dir"),
    (["evaluate", "--probs", "p.csv", "--labels", "l.csv", "--out-dir", "{file}/x"], "--out-dir"),
    (["export", "--adapter", "A", "--out", "{file}/merged"], "--out"),
    (["export", "--adapter", "A", "--out", "{dir}"], "already exists"),
]


@pytest.mark.parametrize("argv, says", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_output_path_exits_2_before_any_work(blocked, capsys, argv, says):
    folder, f = blocked
    argv = [a.format(file=f, dir=folder) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err
    assert str(f) in err or str(folder) in err
