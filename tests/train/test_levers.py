"""benchmarks.levers: the paired table of lever runs, the OOF cut to the base run's rows, and the archive (gzipped
OOF files) that a later session scores again without training. Runs on TF-IDF runs of the sample data (a tfidf run
folder has what a lever run needs: oof.csv, folds.csv, summary.json)."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import SAMPLE_SET_ARGS
from trainkit import SAMPLE_TRAIN

from benchmarks.levers import main as levers
from core.decoding import default_spec
from core.io import read_probs
from train.__main__ import main as train_cli


def tfidf_run(out, *extra):
    assert train_cli(["tfidf", "--set", f"data.train_csv={SAMPLE_TRAIN}", "--set", "cv.n_folds=3", *SAMPLE_SET_ARGS,
                      "--out", str(out), *map(str, extra)]) == 0


def test_table_subset_and_archive_round_trip(tmp_path, capsys):
    runs = tmp_path / "runs"
    tfidf_run(runs / "tfidf", "--C", 1)                                   # all 3 folds
    tfidf_run(runs / "base", "--folds", runs / "tfidf" / "folds.csv", "--set", "cv.folds=[0,1]")
    assert levers(["subset", str(runs / "tfidf" / "oof.csv"), str(runs / "base" / "oof.csv"),
                   str(runs / "tfidf_base_rows.csv")]) == 0
    ids, p, _ = read_probs(runs / "tfidf_base_rows.csv")
    base_ids, _, _ = read_probs(runs / "base" / "oof.csv")
    assert list(map(str, ids)) == list(map(str, base_ids))
    capsys.readouterr()
    assert levers([str(runs), "--labels", str(SAMPLE_TRAIN)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| base", "| tfidf (base's rows)",
                                                            "| blend base + tfidf, nested weights + decoding"]
    assert "(" in table[-2] and table[1].endswith("| - |")                # the paired interval vs base, not for base
    blend = table[-1].split(" | ")
    assert blend[2] == "-" and all(float(x) > 0 for x in blend[3:7])      # no 0.5 column; cascade, tuned, sets, F1
    assert blend[7:10] == ["-", "-", "-"]                                  # no per-row breakdown of a nested blend
    base = table[1].split(" | ")                                          # the sample's 20 classes: none under 1%
    assert 0 < float(base[7]) <= 1 and 0 <= float(base[8]) <= 1 and base[9] == "-"   # EM 1 / 2 labels, rare F1

    assert levers(["archive", str(runs), str(tmp_path / "kept")]) == 0
    assert (tmp_path / "kept" / "base" / "oof.csv.gz").is_file() and (tmp_path / "kept" / "tfidf_base_rows.csv.gz").is_file()
    _, kept, _ = read_probs(tmp_path / "kept" / "tfidf_base_rows.csv.gz")
    assert (kept == p).all()
    capsys.readouterr()
    assert levers([str(tmp_path / "kept"), "--labels", str(SAMPLE_TRAIN), "--work", str(tmp_path / "w")]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert again[1:] == table[1:]
    assert levers(["archive", str(runs)]) == 2

    # One archived set file (benchmarks/oof/NAME.tar.gz): the same files, byte for byte (no time in the gzip
    # headers), read as it is; packing its files again gives the same bytes.
    assert levers(["archive", str(runs), str(tmp_path / "set" / "kept.tar.gz")]) == 0
    assert levers(["unpack", str(tmp_path / "set" / "kept.tar.gz"), str(tmp_path / "x")]) == 0

    def files(folder):
        return {p.relative_to(folder): gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
                for p in folder.rglob("*") if p.is_file()}

    assert files(tmp_path / "x" / "kept") == files(tmp_path / "kept")
    assert {p.relative_to(tmp_path / "x" / "kept"): p.read_bytes() for p in (tmp_path / "x" / "kept").rglob("*.gz")} \
        == {p.relative_to(tmp_path / "kept"): p.read_bytes() for p in (tmp_path / "kept").rglob("*.gz")}
    assert levers(["pack", str(tmp_path / "x" / "kept"), str(tmp_path / "set" / "repacked" / "kept.tar.gz")]) == 0
    assert (tmp_path / "set" / "repacked" / "kept.tar.gz").read_bytes() == (tmp_path / "set" / "kept.tar.gz").read_bytes()
    capsys.readouterr()
    assert levers([str(tmp_path / "set" / "kept.tar.gz"), "--labels", str(SAMPLE_TRAIN)]) == 0
    from_set = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert from_set[1:] == table[1:]
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["kept.tar.gz", "repacked"]  # nothing left beside


def test_an_archived_set_is_read_as_it_is_and_refuses_members_outside_it(tmp_path):
    """``SET.tar.gz/RUN`` names a run inside an archived set, as ``SET/RUN`` did before it was packed; the students
    benchmark pools a new fold's run with such a run (``--pool`` / ``--pool-teacher``)."""
    import tarfile

    from benchmarks.levers import pack, set_folder
    from benchmarks.students import pooled

    tfidf_run(tmp_path / "f0", "--set", "cv.folds=[0]")
    tfidf_run(tmp_path / "kept" / "model", "--folds", tmp_path / "f0" / "folds.csv", "--set", "cv.folds=[1]")
    pack(tmp_path / "kept", tmp_path / "oof" / "kept.tar.gz")
    run = set_folder(f"{tmp_path}/oof/kept.tar.gz/model", tmp_path / "x")
    assert run == tmp_path / "x" / "kept" / "model" and (run / "oof.csv").is_file()
    assert set_folder(tmp_path / "f0", tmp_path / "y") == tmp_path / "f0"          # a folder is itself
    both = pooled(tmp_path / "f0", run, tmp_path / "pooled.csv")
    n0, n1 = (len(read_probs(d / "oof.csv")[0]) for d in (tmp_path / "f0", run))
    assert len(read_probs(both)[0]) == n0 + n1

    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as tar:                   # a member outside bad/
        tar.add(tmp_path / "f0" / "folds.csv", arcname="../folds.csv")
    with pytest.raises(ValueError, match="not a file or folder under bad/"):
        set_folder(tmp_path / "bad.tar.gz", tmp_path / "z")
    with pytest.raises(FileNotFoundError):
        set_folder(tmp_path / "missing.tar.gz/model", tmp_path / "z")


def test_seed_runs_and_their_average(tmp_path, capsys):
    """``seed<N>`` run folders (the base's) come last and ``<run>_seed<N>`` folders follow their run; each run and its
    seeds averaged is scored (and blended) beside them."""
    runs = tmp_path / "runs"
    tfidf_run(runs / "base", "--C", 1)
    for name, c in (("seed13", 16), ("seed7", 4), ("combohd", 2), ("combohd_seed7", 8), ("combohd_seed11", 0.5)):
        tfidf_run(runs / name, "--C", c, "--folds", runs / "base" / "folds.csv")   # other models on base's split
    assert levers([str(runs), "--labels", str(SAMPLE_TRAIN)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| base", "| combohd", "| combohd_seed7", "| combohd_seed11", "| seed7", "| seed13",   # by number, not string
        "| mean of base + seed7 + seed13", "| mean of combohd + combohd_seed7 + combohd_seed11"]
    probs = {n: read_probs(runs / n / "oof.csv")[1] for n in ("base", "seed7", "seed13", "combohd", "combohd_seed7",
                                                                "combohd_seed11")}
    _, mean, _ = read_probs(runs / "eval" / "seeds_mean.csv")
    assert abs(mean - (probs["base"] + probs["seed7"] + probs["seed13"]) / 3).max() < 1e-5
    _, mean, _ = read_probs(runs / "eval" / "combohd_seeds_mean.csv")
    assert abs(mean - (probs["combohd"] + probs["combohd_seed7"] + probs["combohd_seed11"]) / 3).max() < 1e-5
    assert abs(probs["base"] - probs["seed7"]).max() > 1e-3 and abs(probs["combohd"] - mean).max() > 1e-3
    names = read_probs(runs / "base" / "oof.csv")[2]   # the average decodes as its runs: fallback trend_id_res19
    assert default_spec(runs / "eval" / "combohd_seeds_mean.csv", names).fallback == 19
    assert default_spec(runs / "eval" / "seeds_mean.csv", names).fallback == 19

    assert levers(["archive", str(runs), str(tmp_path / "kept")]) == 0   # the seed runs are kept with the others
    assert all((tmp_path / "kept" / n / "oof.csv.gz").is_file() for n in probs)


def test_another_base_and_a_subset_of_runs(tmp_path, capsys):
    """``--base NAME`` pairs every run with NAME instead of base (e.g. the bf16 levers with the bf16 run) and
    ``--only`` lists just the named runs; a base without OOF and folds is refused by name."""
    runs = tmp_path / "runs"
    tfidf_run(runs / "base", "--C", 1)
    for name, c in (("bf16", 4), ("combo", 16), ("headdesc", 0.25)):
        tfidf_run(runs / name, "--C", c, "--folds", runs / "base" / "folds.csv")
    assert levers([str(runs), "--labels", str(SAMPLE_TRAIN), "--base", "bf16", "--only", "combo"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| bf16", "| combo"]
    assert table[1].endswith("| - |") and "(" in table[2]
    assert levers([str(runs), "--labels", str(SAMPLE_TRAIN), "--only", "combo", "--work", str(tmp_path / "w")]) == 0
    versus_base = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert versus_base[2].split(" | ")[:4] == table[2].split(" | ")[:4]   # combo's own figures do not depend on the base
    assert versus_base[2].split(" | ")[-1] != table[2].split(" | ")[-1]    # its paired difference does
    with pytest.raises(SystemExit, match="nothing"):
        levers([str(runs), "--labels", str(SAMPLE_TRAIN), "--base", "nothing"])


def test_join_makes_one_run_of_two_runs_on_other_folds_and_refuses_what_is_not(tmp_path, capsys):
    # A folds 0 screen and its folds 1-2 run later, joined: the rows of the same config's run on all 3 folds.
    full, a, b = tmp_path / "full", tmp_path / "a", tmp_path / "b"
    tfidf_run(full)
    split = ["--folds", full / "folds.csv"]
    tfidf_run(a, *split, "--set", "cv.folds=[0]")
    tfidf_run(b, *split, "--set", "cv.folds=[1,2]")
    assert levers(["join", str(a), str(b), str(tmp_path / "ab")]) == 0
    ids, p, names = read_probs(tmp_path / "ab" / "oof.csv")
    full_ids, full_p, full_names = read_probs(full / "oof.csv")
    assert names == full_names and sorted(map(str, ids)) == sorted(map(str, full_ids))
    order = {str(i): k for k, i in enumerate(full_ids)}
    assert abs(p - full_p[[order[str(i)] for i in ids]]).max() < 1e-6
    assert json.loads((tmp_path / "ab" / "summary.json").read_text())["folds"] == [0, 1, 2]
    assert (tmp_path / "ab" / "folds.csv").read_bytes() == (full / "folds.csv").read_bytes()

    with pytest.raises(SystemExit, match=r"in both runs"):
        levers(["join", str(a), str(full), str(tmp_path / "x")])
    other = tmp_path / "other"
    tfidf_run(other, *split, "--set", "cv.folds=[1,2]", "--set", "data.max_length=64")
    with pytest.raises(SystemExit, match=r"different configs \(data\.max_length 256 -> 64\)"):
        levers(["join", str(a), str(other), str(tmp_path / "y")])
    c1 = tmp_path / "c1"
    tfidf_run(c1, *split, "--set", "cv.folds=[1,2]", "--C", 1)             # TF-IDF's C is not in the config
    with pytest.raises(SystemExit, match=r"different configs \(model .*C=4.0.* -> .*C=1"):
        levers(["join", str(a), str(c1), str(tmp_path / "z")])
    assert not any((tmp_path / n).exists() for n in "xyz")
