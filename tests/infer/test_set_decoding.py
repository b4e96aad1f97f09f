"""Set decoding through the infer commands: ``tune --strategy sets`` writes a ``"strategy": "sets"`` thresholds.json;
``read_thresholds``, submit, evaluate, serve, the ui and the Hub card reproduce it (:mod:`core.sets` itself:
tests/core/test_sets.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from core.sets import SetDecoder
from core.thresholds import ThresholdSpec

# --------------------------------------------------------------------------------------------------------------
# thresholds.json with "strategy": "sets": tune writes it; read_thresholds, submit, evaluate and serve reproduce it
# --------------------------------------------------------------------------------------------------------------


def _sibling(path: str):
    """Another test file (for its helpers), by its path under tests/."""
    spec = importlib.util.spec_from_file_location(f"_qlml_sets_{Path(path).stem}", Path(__file__).parents[1] / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def sets_files(tmp_path, capsys):
    from core.io import write_probs
    from infer.__main__ import main

    cli = _sibling("infer/test_infer_cli.py")
    probs, y = _sibling("core/test_sets.py").correlated_data(400, n_labels=20, seed=1)
    names = [f"trend_id_res{j}" for j in range(20)]
    ids = np.arange(5000, 5400)
    labels = cli.write_labels(tmp_path / "train.csv", ids, y)
    oof = tmp_path / "oof.csv"
    write_probs(oof, ids, probs, names)
    out = tmp_path / "thresholds.json"
    code = main([str(a) for a in ["tune", "--oof", oof, "--labels", labels, "--out", out, "--n-trials", 15,
                                  "--no-progress", "--strategy", "sets"]])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    return {"dir": tmp_path, "ids": ids, "y": y, "p": probs, "names": names, "labels": labels, "oof": oof,
            "thr": out, "stdout": stdout, "main": main}


def test_tune_strategy_sets_reports_three_columns_and_writes_a_sets_file(sets_files):
    import json

    from core.decoding import read_thresholds

    out = sets_files["stdout"]
    assert "sets (nested)" in out and "tuned (nested)" in out and "default cascade" in out
    assert "set decoding (written): lambda" in out
    d = json.loads(sets_files["thr"].read_text())
    assert d["strategy"] == "sets" and {"lambda", "temperature", "candidates", "log_priors"} <= set(d["sets"])
    assert "sets" in d["meta"]["nested"]["pooled"] and "sets" in d["meta"]["in_sample"]
    dec = read_thresholds(sets_files["thr"])
    assert isinstance(dec, SetDecoder) and list(dec.label_names) == sets_files["names"]
    assert dec.sets == SetDecoder.fit(sets_files["y"]).sets  # priors from every labelled OOF row
    # An old cascade file (no "strategy" key) still reads as a cascade.
    old = sets_files["dir"] / "old.json"
    old.write_text(json.dumps({k: v for k, v in d.items() if k not in ("strategy", "sets")}))
    spec = read_thresholds(old)
    assert isinstance(spec, ThresholdSpec) and spec == dec.cascade
    bad = sets_files["dir"] / "bad.json"
    bad.write_text(json.dumps({**d, "strategy": "magic"}))
    from core.errors import InputError

    with pytest.raises(InputError, match="unknown decoding strategy"):
        read_thresholds(bad)
    bad.write_text(json.dumps({**d, "sets": {**d["sets"], "lambda": -1}}))
    with pytest.raises(InputError, match="invalid set decoding"):
        read_thresholds(bad)


def test_submit_and_evaluate_reproduce_the_set_decoding(sets_files, capsys):
    import json

    import pandas as pd

    from core.decoding import read_thresholds
    from core.io import write_probs
    from core.metrics import scores

    main, d = sets_files["main"], sets_files
    dec = read_thresholds(d["thr"])
    expected = dec.decode(d["p"])
    sub = d["dir"] / "sub.csv"
    assert main(["submit", "--probs", str(d["oof"]), "--thresholds", str(d["thr"]), "--out", str(sub)]) == 0
    assert "set-decoded" in capsys.readouterr().out
    targets = pd.read_csv(sub, dtype={"target": str}, keep_default_na=False)["target"]
    assert list(targets) == [" ".join(map(str, np.flatnonzero(r))) for r in expected]
    # Columns in another order: the same submission.
    perm = np.random.default_rng(0).permutation(20)
    shuffled = d["dir"] / "shuffled.csv"
    write_probs(shuffled, d["ids"], d["p"][:, perm], [d["names"][j] for j in perm])
    sub2 = d["dir"] / "sub2.csv"
    assert main(["submit", "--probs", str(shuffled), "--thresholds", str(d["thr"]), "--out", str(sub2)]) == 0
    assert sub2.read_text() == sub.read_text()
    # --fallback overrides the fallback of the cascade candidate.
    sub3 = d["dir"] / "sub3.csv"
    assert main(["submit", "--probs", str(d["oof"]), "--thresholds", str(d["thr"]), "--fallback", "none",
                 "--out", str(sub3)]) == 0
    c = dec.cascade
    want = dec.with_cascade(ThresholdSpec(c.label_names, c.start, c.stop, c.step, None, c.class_offsets)).decode(d["p"])
    targets = pd.read_csv(sub3, dtype={"target": str}, keep_default_na=False)["target"]
    assert list(targets) == [" ".join(map(str, np.flatnonzero(r))) for r in want]
    assert main(["evaluate", "--probs", str(shuffled), "--labels", str(d["labels"]), "--thresholds", str(d["thr"]),
                 "--out-dir", str(d["dir"] / "eval")]) == 0
    m = json.loads((d["dir"] / "eval" / "shuffled.eval.json").read_text())
    assert m["metrics"]["tuned"] == pytest.approx(scores(d["y"], expected))
    capsys.readouterr()
    assert main(["evaluate", "--probs", str(d["oof"]), "--labels", str(d["labels"]), "--thresholds", str(d["thr"]),
                 "--out-dir", str(d["dir"] / "eval")]) == 0
    nested = dec.meta["nested"]["pooled"]["sets"]["exact_match"]  # the note quotes the sets' nested estimate
    assert f"its nested estimate: exact_match {nested:.4f}" in capsys.readouterr().out


def test_serve_decodes_with_a_sets_file_in_its_label_order(tmp_path):
    import json

    import httpx

    from core.decoding import adapter_spec
    from core.sets import cascade_of
    from infer.serve.app import serve_in_thread
    from infer.serve.settings import Settings
    from infer.ui import result_frame, threshold_lines

    srv = _sibling("infer/test_serve.py")
    names = list(reversed(srv.LABELS))
    rng = np.random.default_rng(0)
    y = (rng.random((60, 20)) < 0.1).astype(np.int8)
    dec = SetDecoder.fit(y, names, ThresholdSpec(tuple(names), fallback=None), lam=2.0)
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(dec.to_dict()))
    ref = srv.fake_refs()[0]
    spec = adapter_spec(ref, path)
    assert list(spec.label_names) == srv.LABELS
    app, _ = srv.served(Settings(thresholds=str(path)))
    with serve_in_thread(app) as url:
        srv.wait_ready(url)
        info = httpx.get(f"{url}/info").json()
        assert info["thresholds"]["strategy"] == "sets"
        r = httpx.post(f"{url}/predict", json={"rows": [srv.ROW]})
        assert r.status_code == 200, r.text
        row = r.json()["rows"][0]
    probs = np.array([p["probability"] for p in row["probabilities"]])  # in the adapter's label order
    want = dec.decode(probs[::-1][None])[0][::-1]
    assert row["labels"] == [n for n, v in zip(srv.LABELS, want) if v]
    # the ui draws the cascade candidate's thresholds
    assert threshold_lines(spec)[0][0] == cascade_of(spec).steps[0]
    assert len(result_frame(probs, want, spec, {})) == 20


def test_hub_card_shows_the_set_decoding_parameters_not_its_candidates(tmp_path):
    import json

    from infer import hub

    hub_tests = _sibling("infer/test_hub.py")
    run = hub_tests.make_fake_run(tmp_path, thresholds=True)
    labels = (np.random.default_rng(0).random((200, len(hub_tests.LABELS))) < 0.3).astype(np.int8)
    dec = SetDecoder.fit(labels, hub_tests.LABELS, lam=0.5)
    assert len(dec.sets) == 8
    (run / "thresholds.json").write_text(json.dumps(dec.to_dict()))
    card = hub.upload_plan(run, "user/my-run")[0].content.decode()
    section = card.split("## Decision thresholds")[1].split("## Labels")[0]
    assert '"strategy": "sets"' in section and '"lambda": 0.5' in section
    assert f"{len(dec.sets)} label sets (see thresholds.json)" in section and "log_priors" not in section
