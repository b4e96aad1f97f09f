"""``python -m infer audit``: duplicates (exact, near, train vs test), conflicting labels, empty rows and cleanlab's
label issues on small synthetic CSVs whose columns are not the DLS ones (they come from the config); bad input exits
2 naming the file / column, with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.io import write_probs
from infer.__main__ import main
from infer.audit import (
    conflicts,
    empty_reason,
    exact_groups,
    label_issues,
    majority,
    majority_fix,
    near_pairs,
    near_text,
    normalise_text,
)

LABELS = ["lab_a", "lab_b", "lab_c", "lab_d"]
CONFIG = """data:
  id_column: rid
  text_template: "{title}: {body}"
  label_prefix: lab_
"""
ALPHABET = list("абвгдежзиклмнопрстуфхцчшщэюя")

# id: (title, body, labels) - the planted cases; the rest of the rows are random distinct words
PLANTED = {
    1: ("t", "Доставка долгая", "lab_a"),
    2: ("t", "доставка   ДОЛГАЯ", "lab_a"),           # exact duplicate of 1 (case, spaces), same labels
    3: ("t", "Хорошо", "lab_b"),
    4: ("x", "хорошо", "lab_c"),                      # exact duplicate of 3 with other labels: a conflict
    5: ("t", "Курьер опоздал на час и заказ холодный", "lab_a"),
    6: ("t", "курьер опоздал на час, и заказ холодный!!!", "lab_d"),  # near duplicate of 5, conflicting
    7: ("t", "", "lab_b"),                            # empty
    8: ("t", "...!?", "lab_b"),                       # only punctuation
    9: ("t", "👍", "lab_b"),                          # an emoji is content
}


def random_text(rng) -> str:
    return " ".join("".join(rng.choice(ALPHABET, size=rng.integers(5, 9))) for _ in range(3))


def write_data(tmp_path, n=120, seed=0):
    """A labelled CSV (rid, title, body, lab_*), a test CSV and a config naming those columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for rid, (title, body, label) in PLANTED.items():
        rows.append({"rid": rid, "title": title, "body": body, **{c: int(c == label) for c in LABELS}})
    for k in range(n - len(PLANTED)):
        y = LABELS[k % len(LABELS)]
        rows.append({"rid": 100 + k, "title": "t", "body": random_text(rng), **{c: int(c == y) for c in LABELS}})
    train = pd.DataFrame(rows)
    train.to_csv(tmp_path / "train.csv", index=False)
    test = pd.DataFrame([{"rid": 1, "title": "t", "body": "ХОРОШО"},            # exact duplicate of 3 and 4
                         {"rid": 2, "title": "t", "body": "Доставка долгая!"},  # near duplicate of 1 and 2
                         {"rid": 3, "title": "t", "body": random_text(rng)},   # new
                         {"rid": 4, "title": "t", "body": " "}])               # empty
    test.to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    return train


def write_oof(tmp_path, train, planted_row=None, seed=0):
    """Confident, right out-of-fold probabilities, except the planted row's: they say lab_c where lab_a is given."""
    rng = np.random.default_rng(seed)
    y = train[LABELS].to_numpy()
    p = np.clip(np.where(y == 1, 0.9, 0.04) + rng.normal(0, 0.03, y.shape), 0.001, 0.999)
    if planted_row is not None:
        p[planted_row] = [0.02, 0.03, 0.97, 0.02]
    write_probs(tmp_path / "oof.csv", train["rid"].to_numpy(), p, LABELS, id_column="rid")
    return tmp_path / "oof.csv"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def flagged_by_id(out_dir, file="train") -> dict:
    df = pd.read_csv(out_dir / "flagged.csv", keep_default_na=False)
    df = df[df["file"] == file]
    return {int(r["id"]): r for _, r in df.iterrows()}


# ------------------------------------------------------------------------------------------------ pure functions
def test_normalise_and_empty_and_near_text():
    assert normalise_text("  Доставка \t ДОЛГАЯ\n") == "доставка долгая"
    assert normalise_text("ＡＢＣ") == "abc"  # NFKC: full-width letters
    assert empty_reason("") == "empty_text" and empty_reason(" \n\t") == "empty_text"
    assert empty_reason("...!?") == "punctuation_only" and empty_reason(" - ; ") == "punctuation_only"
    assert empty_reason("👍") is None and empty_reason("[NUM]") is None and empty_reason("ok.") is None
    assert near_text("Очень долгая доставка!!! 🚚") == "очень долгая доставка"
    assert near_text("❤️❤️") == "" and near_text("🤔🏳️‍🌈") == ""  # emoji only: nothing to compare nearly


def test_exact_groups_conflicts_majority():
    groups = exact_groups(["a", "b", "a", None, None, "c", "b", "a"])
    assert groups.tolist() == [0, 1, 0, -1, -1, -1, 1, 0]  # None (an empty row) is never grouped
    y = np.array([[1, 0], [1, 0], [0, 1]])
    assert conflicts([(0, 1), (0, 2), (1, 2)], y) == {0: [2], 2: [0, 1], 1: [2]}
    assert majority(np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]])).tolist() == [1, 0, 1]
    assert majority(np.array([[1, 0], [0, 1]])).tolist() == [0, 0]  # a tie is no majority
    y = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1]])
    fixed = majority_fix(y, np.array([0, 0, 0, 1, 1, -1]))
    # group 0: per class 2/3, 1/3, 2/3; group 1 (a pair): every class a tie, each row keeps its own; row 5: no group
    assert fixed.tolist() == [[1, 0, 1], [1, 0, 1], [1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_near_pairs_threshold():
    texts = ["очень долгая доставка", "долгая доставка очень", "маленький ассортимент", "цены высокие"]
    a, b, s = near_pairs(texts, floor=0.9)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1)] and s[0] == pytest.approx(1.0)  # word order is ignored
    qa, qb, _ = near_pairs(texts, ["ассортимент маленький", "совсем другое"], floor=0.9)
    assert list(zip(qa.tolist(), qb.tolist())) == [(0, 2)]


def test_label_issues_find_the_planted_error():
    rng = np.random.default_rng(0)
    y = np.eye(4, dtype=np.int8)[rng.integers(0, 4, 200)]
    p = np.clip(np.where(y == 1, 0.9, 0.04) + rng.normal(0, 0.03, y.shape), 0.001, 0.999)
    y[17] = [1, 0, 0, 0]
    p[17] = [0.02, 0.03, 0.97, 0.02]
    mask, quality, per_class, _ = label_issues(y, p)
    assert np.flatnonzero(mask).tolist() == [17]
    assert int(np.argmin(quality)) == 17 and quality[17] < 0.1 < quality[np.arange(200) != 17].min()
    assert np.flatnonzero(per_class[17]).tolist() == [0, 2]  # lab 0 given but absent, lab 2 missing


# ------------------------------------------------------------------------------------------------------ the CLI
def test_audit_flags_every_planted_case(tmp_path, capsys):
    train = write_data(tmp_path)
    planted_row = int(np.flatnonzero(train["rid"] == 110)[0])  # a random text given lab_? that the OOF calls lab_c
    train.loc[planted_row, LABELS] = [1, 0, 0, 0]
    train.to_csv(tmp_path / "train.csv", index=False)
    oof = write_oof(tmp_path, train, planted_row)
    out = tmp_path / "audit"
    code, stdout, err = run(["audit", "--labels", tmp_path / "train.csv", "--test", tmp_path / "test.csv",
                             "--oof", oof, "--config", tmp_path / "cfg.yaml", "--out", out], capsys)
    assert code == 0, err
    assert "exact_conflict" in stdout and "label_issue" in stdout
    f = flagged_by_id(out)
    assert f[1]["reasons"].split() == ["exact_duplicate"] and f[1]["duplicate_ids"] == "2"
    assert f[1]["majority_labels"] == "lab_a"
    assert set(f[3]["reasons"].split()) == {"exact_duplicate", "exact_conflict"} and f[3]["conflict_ids"] == "4"
    assert f[3]["majority_labels"] == ""  # one lab_b, one lab_c: no majority
    assert set(f[5]["reasons"].split()) == {"near_duplicate", "near_conflict"} and f[5]["conflict_ids"] == "6"
    assert float(f[5]["near_similarity"]) >= 0.9
    assert f[7]["reasons"] == "empty_text" and f[8]["reasons"] == "punctuation_only"
    assert 9 not in f or "empty" not in f[9]["reasons"]
    assert f[110]["reasons"] == "label_issue" and f[110]["suspect_labels"] == "-lab_a +lab_c"
    issues = [i for i, r in f.items() if "label_issue" in r["reasons"]]
    assert issues == [110]
    assert float(f[110]["label_quality"]) < 0.1
    assert not any(i >= 100 and i != 110 for i in f)  # the random distinct rows are clean

    t = flagged_by_id(out, "test")
    assert t[1]["reasons"] == "test_exact_in_train" and t[1]["duplicate_ids"] == "3 4"
    assert t[2]["reasons"] == "test_near_in_train" and t[2]["duplicate_ids"] == "1 2"
    assert t[2]["majority_labels"] == "lab_a"
    assert t[4]["reasons"] == "empty_text" and 3 not in t

    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["exact_duplicate"] == 4 and summary["counts"]["exact_conflict"] == 2
    assert summary["counts"]["near_conflict"] == 2 and summary["counts"]["label_issue"] == 1
    assert summary["counts"]["empty_text"] == 1 and summary["counts"]["punctuation_only"] == 1
    assert summary["test_counts"] == {"empty_text": 1, "punctuation_only": 0, "test_exact_in_train": 1,
                                      "test_near_in_train": 1}
    assert summary["exact_groups"] == 2 and summary["exact_conflict_groups"] == 1
    assert summary["data"]["id_column"] == "rid" and summary["label_names"] == LABELS
    assert summary["settings"]["near_threshold"] == 0.9 and "cleanlab" in summary["versions"]
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["audit.png", "flagged.csv", "summary.json",
                                                     "train_labels_dropped.csv", "train_labels_majority.csv"]
    # The rows to train on: the conflicts, the empty rows and the label issue go; agreeing duplicates stay.
    kept = pd.read_csv(out / "train_labels_dropped.csv")
    assert set(train["rid"]) - set(kept["rid"]) == {3, 4, 5, 6, 7, 8, 110}
    assert list(kept.columns) == list(train.columns) and summary["training_labels"]["dropped_rows"] == 7
    assert pd.read_csv(out / "train_labels_majority.csv").equals(pd.read_csv(tmp_path / "train.csv"))  # pairs tie

    # An earlier audit's folder is replaced; without --oof no label issue is claimed.
    code, stdout, err = run(["audit", "--labels", tmp_path / "train.csv", "--config", tmp_path / "cfg.yaml",
                             "--out", out], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert "label_issue" not in summary["counts"] and "not checked" in stdout
    assert "label_issue" not in pd.read_csv(out / "flagged.csv")["reasons"].str.cat(sep=" ")
    assert 110 in set(pd.read_csv(out / "train_labels_dropped.csv")["rid"])  # no --oof: no label issue to drop


def test_on_prompt_compares_the_whole_prompt(tmp_path, capsys):
    write_data(tmp_path)
    out = tmp_path / "audit"
    code, _, err = run(["audit", "--labels", tmp_path / "train.csv", "--config", tmp_path / "cfg.yaml",
                        "--on", "prompt", "--out", out], capsys)
    assert code == 0, err
    f = flagged_by_id(out)
    assert "exact_duplicate" in f[1]["reasons"]  # same title and body
    assert 3 not in f or "exact" not in f[3]["reasons"]  # same body, other title: another prompt


def test_config_comes_from_the_run_beside_the_oof(tmp_path, capsys):
    train = write_data(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.yaml").write_text(CONFIG)
    oof = pd.read_csv(write_oof(tmp_path, train)).iloc[::2]  # the rows of some folds, with a fold column
    oof.assign(fold=0).to_csv(run_dir / "oof.csv", index=False)
    code, _, err = run(["audit", "--labels", tmp_path / "train.csv", "--oof", run_dir / "oof.csv",
                        "--out", tmp_path / "audit"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["inputs"]["config"].endswith("run_config.yaml") and summary["oof_rows"] == len(oof)
    f = pd.read_csv(tmp_path / "audit" / "flagged.csv")
    assert f["label_quality"].notna().sum() == f["id"].isin(oof["rid"]).sum()  # scores on the OOF rows only


@pytest.mark.parametrize("case, needle", [
    ("missing_labels", "nope.csv: file not found"),
    ("id_column", "missing column(s) ['rid']"),
    ("oof_columns", "oof.csv: class columns do not match"),
    ("oof_ids", "oof.csv: row 2 has id 999"),
    ("test_column", "test.csv: missing column(s) ['body']"),
    ("oof_one_class", "oof.csv: cleanlab cannot judge these labels: label issues need at least two classes"),
    ("out_is_file", "--out"),
    ("out_has_other_files", "holds other files (keep.txt)"),
    ("threshold", "--near-threshold must be in (0, 1]"),
    ("drop", "--drop: unknown reason(s) ['test_exact_in_train']"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case, needle):
    train = write_data(tmp_path)
    labels, cfg, out = tmp_path / "train.csv", tmp_path / "cfg.yaml", tmp_path / "audit"
    extra = []
    if case == "missing_labels":
        labels = tmp_path / "nope.csv"
    elif case == "id_column":
        train.rename(columns={"rid": "row"}).to_csv(labels, index=False)
    elif case == "oof_columns":
        write_probs(tmp_path / "oof.csv", train["rid"].to_numpy(), np.full((len(train), 3), 0.5), LABELS[:3])
        extra = ["--oof", tmp_path / "oof.csv"]
    elif case == "oof_ids":
        write_probs(tmp_path / "oof.csv", [999], np.full((1, 4), 0.5), LABELS)
        extra = ["--oof", tmp_path / "oof.csv"]
    elif case == "oof_one_class":
        rows = train[train["lab_a"] == 1]
        write_probs(tmp_path / "oof.csv", rows["rid"].to_numpy(), np.full((len(rows), 4), 0.5), LABELS)
        extra = ["--oof", tmp_path / "oof.csv"]
    elif case == "test_column":
        pd.read_csv(tmp_path / "test.csv").drop(columns="body").to_csv(tmp_path / "test.csv", index=False)
        extra = ["--test", tmp_path / "test.csv"]
    elif case == "out_is_file":
        out.write_text("x")
    elif case == "out_has_other_files":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "threshold":
        extra = ["--near-threshold", "1.5"]
    elif case == "drop":
        extra = ["--drop", "exact_conflict,test_exact_in_train"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run(["audit", "--labels", labels, "--config", cfg, "--out", out, *extra], capsys)
    assert code == 2 and err.startswith("error: ") and needle in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_training_label_files(tmp_path, capsys):
    """A hand-made CSV: a three-row duplicate group that disagrees, a conflicting pair, an agreeing pair and an empty
    row; the files to train on keep every column verbatim."""
    rows = [(1, "007", "Долго", [1, 0, 0, 0]), (2, "t", "долго", [1, 0, 0, 0]), (3, "t", "ДОЛГО", [0, 1, 0, 0]),
            (4, "t", "Хорошо", [0, 1, 1, 0]), (5, "", "хорошо", [0, 1, 0, 0]),
            (6, "t", "", [0, 0, 0, 1]),
            (7, "t", "Курьер молодец", [0, 0, 1, 1]), (8, "t", "курьер молодец", [0, 0, 1, 1])]
    rng = np.random.default_rng(1)
    rows += [(100 + k, "t", random_text(rng), list(np.eye(4, dtype=int)[k % 4])) for k in range(12)]
    train = pd.DataFrame([{"rid": i, "title": t, "body": b, **dict(zip(LABELS, y))} for i, t, b, y in rows])
    train.to_csv(tmp_path / "train.csv")  # with a nameless index column, as the DLS train.csv has
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    out = tmp_path / "audit"
    code, stdout, err = run(["audit", "--labels", tmp_path / "train.csv", "--config", tmp_path / "cfg.yaml",
                             "--out", out], capsys)
    assert code == 0, err
    assert "train_labels_dropped.csv keeps 14 rows (6 dropped" in stdout
    header = (tmp_path / "train.csv").read_text().splitlines()[0]
    assert header.startswith(",rid,title") and (out / "train_labels_dropped.csv").read_text().startswith(header)
    raw = pd.read_csv(out / "train_labels_dropped.csv", dtype=str, keep_default_na=False)
    assert raw["rid"].tolist() == ["7", "8", *[str(100 + k) for k in range(12)]]  # 1-6 dropped, the order kept
    majority_csv = out / "train_labels_majority.csv"
    fixed = pd.read_csv(majority_csv, dtype=str, keep_default_na=False)
    assert fixed["title"].tolist()[:5] == ["007", "t", "t", "t", ""]  # cells verbatim (no 7, no nan)
    expected = pd.read_csv(tmp_path / "train.csv", dtype=str, keep_default_na=False)
    expected.loc[2, LABELS] = ["1", "0", "0", "0"]  # row 3 takes its group's majority; the pair 4/5 ties: each keeps
    assert fixed.equals(expected)                   # its own labels
    summary = json.loads((out / "summary.json").read_text())["training_labels"]
    assert (summary["kept_rows"], summary["majority_rows_changed"], summary["majority_labels_changed"]) == (14, 1, 2)

    # --drop: only the empty rows; the training files are usable as data.train_labels_csv of the same data
    code, stdout, err = run(["audit", "--labels", tmp_path / "train.csv", "--config", tmp_path / "cfg.yaml",
                             "--drop", "empty_text,punctuation_only", "--out", out], capsys)
    assert code == 0, err
    assert set(pd.read_csv(out / "train_labels_dropped.csv")["rid"]) == set(train["rid"]) - {6}

    from core.config import RunConfig
    from core.data import read_csv
    from train.data import read_training_labels

    for name, not_trained, relabelled in (("train_labels_dropped.csv", 1, 0), ("train_labels_majority.csv", 0, 1)):
        cfg = RunConfig.from_yaml(tmp_path / "cfg.yaml", [f"data.train_labels_csv={out / name}"])
        tl = read_training_labels(cfg.data, read_csv(tmp_path / "train.csv", cfg.data))
        assert (int((~tl.trained).sum()), tl.relabelled) == (not_trained, relabelled)
