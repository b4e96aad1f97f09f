"""infer.ui (python -m infer ui) on the tiny trained run: form fields from the template, validation, the result of a
submitted review (chart data, predicted classes), the CSV tab, the --api client against a stub server, and once in
a real headless browser (Debian's chromium; skipped when it is missing)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.data import format_prompt, format_value
from core.errors import InputError
from infer import ui
from infer.__main__ import main
from infer.commands import ui as ui_command

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TEST = REPO / "data" / "sample_test.csv"
APP = str(REPO / "infer" / "ui_app.py")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def adapter(tiny_run) -> Path:
    return tiny_run / "fold_0" / "last"


@pytest.fixture(scope="module")
def predictor(adapter):
    from infer.predict import load_predictor

    p = load_predictor(str(adapter))
    yield p
    p.close()


def app_test(monkeypatch, *args: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(ui.ARGS_ENV, " ".join(args))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# --------------------------------------------------------------------------------------------------------------
# The one formatter: a multiselect list formats like the CSV's set literal
# --------------------------------------------------------------------------------------------------------------


def test_format_value_lists_like_set_literals():
    assert format_value(["DELIVERY", "PRICE"]) == format_value("{DELIVERY,PRICE}") == "DELIVERY,PRICE"
    assert format_value(("A",)) == "A" and format_value([]) == "" == format_value("{}")
    assert format_value([1, 2.5]) == "1,2.5"
    row_csv = {"assessment": 2.0, "tags": "{CATALOG_NAVIGATION,PRICE}", "text": "t"}
    row_ui = {"assessment": 2.0, "tags": ["CATALOG_NAVIGATION", "PRICE"], "text": "t"}
    from core.config import DEFAULT_TEMPLATE

    assert format_prompt(DEFAULT_TEMPLATE, row_ui) == format_prompt(DEFAULT_TEMPLATE, row_csv)


# --------------------------------------------------------------------------------------------------------------
# Pure parts: fields, validation, decoding, result frame, command line
# --------------------------------------------------------------------------------------------------------------


def test_form_fields_from_template_and_training_data(adapter, small_csv):
    from core.adapter import read_adapter

    ref = read_adapter(adapter)
    fields = {f.name: f for f in ui.form_fields(ref)}
    assert list(fields) == ["assessment", "tags", "text"]  # the template's order
    df = pd.read_csv(small_csv)
    a = fields["assessment"]
    assert a.kind == "number" and not a.integer and isinstance(a.default, float)
    assert (a.min_value, a.max_value, a.step) == (df["assessment"].min(), df["assessment"].max(), 1.0)
    tags = {t for v in df["tags"].dropna() for t in v.strip("{}").split(",")}
    assert fields["tags"].kind == "multiselect" and fields["tags"].options == sorted(tags)
    assert fields["text"].kind == "text" and fields["text"].required


def test_form_fields_without_training_data_are_text(adapter, tmp_path):
    from core.adapter import read_adapter

    copy = shutil.copytree(adapter, tmp_path / "a")
    cfg = (copy / "run_config.yaml").read_text()
    train_csv = read_adapter(adapter).cfg.data.train_csv
    (copy / "run_config.yaml").write_text(cfg.replace(train_csv, str(tmp_path / "gone.csv")))
    fields = ui.form_fields(read_adapter(copy))
    assert [(f.name, f.kind, f.required) for f in fields] == [("assessment", "text", True), ("tags", "text", True),
                                                              ("text", "text", True)]
    assert [f.required for f in ui.form_fields(read_adapter(copy), allow_empty=True)] == [False] * 3


def test_validate_messages():
    fields = [ui.FormField("text", "text"), ui.FormField("note", "text", required=False),
              ui.FormField("tags", "multiselect")]
    assert ui.validate(fields, {"text": "ok", "note": "", "tags": []}, 250) == []
    assert ui.validate(fields, {"text": "  ", "note": ""}, 250) == ["text: may not be empty"]
    assert ui.validate(fields, {"text": "x" * 251, "note": "y" * 3}, 250) == [
        "text: at most 250 characters (251 given)"]
    assert ui.validate(fields, {"text": "x" * 250, "note": "y" * 11}, 10) == [
        "text: at most 10 characters (250 given)", "note: at most 10 characters (11 given)"]


def test_default_spec_thresholds_and_result_frame(adapter, tmp_path):
    from core.adapter import read_adapter
    from core.thresholds import ThresholdSpec

    ref = read_adapter(adapter)
    spec = ui.default_spec(ref)   # the adapter config's decode section: the sample data's fallback trend_id_res19
    assert spec == ThresholdSpec(tuple(ref.label_names), fallback=ref.label_names.index("trend_id_res19"))
    assert ui.threshold_lines(spec) == [(0.55, "cascade start 0.55"), (0.2, "lowest step 0.2")]
    assert ui.load_spec(ref, None) == spec
    # a tuned file in another label order is reordered to the adapter's
    names = list(reversed(ref.label_names))
    offsets = [0.01 * i for i in range(len(names))]
    tuned = ThresholdSpec(tuple(names), 0.5, 0.3, 0.1, 0, tuple(offsets))
    (tmp_path / "t.json").write_text(json.dumps(tuned.to_dict()))
    got = ui.load_spec(ref, str(tmp_path / "t.json"))
    assert got.label_names == tuple(ref.label_names) and got.fallback == len(names) - 1
    assert got.class_offsets[0] == offsets[-1] and ui.threshold_lines(got)[0] == (0.5, "cascade start 0.5")
    probs = np.linspace(0.05, 0.9, len(names))
    frame = ui.result_frame(probs, got.decode(probs[None])[0], got, ref.descriptions)
    assert list(frame["probability"]) == sorted(probs, reverse=True)
    assert frame["name"].iloc[0] == ref.descriptions[ref.label_names[-1]]
    assert frame["predicted"].iloc[0] and not frame["predicted"].iloc[-1]
    fig = ui.chart(frame, got)
    assert len(fig.axes[0].patches) == len(names)
    (tmp_path / "bad.json").write_text(json.dumps(ThresholdSpec(("a", "b")).to_dict() | {"fallback": None}))
    with pytest.raises(InputError, match="different label set"):
        ui.load_spec(ref, str(tmp_path / "bad.json"))


def test_command_binds_localhost_and_bad_adapter_fails_before_starting(adapter, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="python -m infer")
    ui_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ui", "--adapter", str(adapter), "--api", "http://h:1", "--port", "8600"])
    cmd = ui_command.streamlit_command(args)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(ui.APP)]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[cmd.index("--server.port") + 1] == "8600"
    cfg = ui.parse_app_args(cmd[cmd.index("--") + 1:])
    assert (cfg.adapter, cfg.api, cfg.max_text_chars, cfg.allow_empty) == (str(adapter), "http://h:1", 250, False)
    assert main(["ui", "--adapter", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter folder not found") and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------------------
# The app (streamlit.testing AppTest), in-process predictor
# --------------------------------------------------------------------------------------------------------------


def test_app_form_validation_and_result(adapter, predictor, monkeypatch):
    at = app_test(monkeypatch, "--adapter", str(adapter))
    assert [w.label for w in at.number_input] == ["assessment"]
    assert [w.label for w in at.multiselect] == ["tags"] and [w.label for w in at.text_area] == ["text"]
    assert [t.label for t in at.tabs] == ["One text", "Score a CSV"]

    at.text_area[0].set_value("   ")
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["text: may not be empty"]
    at.text_area[0].set_value("д" * 251)
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["text: at most 250 characters (251 given)"]
    assert at.session_state["result"] is None

    review = "Долгая доставка, курьер опоздал"
    at.number_input[0].set_value(4.0)
    at.multiselect[0].set_value(["DELIVERY", "PRICE"])
    at.text_area[0].set_value(review)
    at.button[0].click().run()
    assert not at.error and not at.exception
    result = at.session_state["result"]
    want_prompt = format_prompt(predictor.data.text_template,
                                {"assessment": 4.0, "tags": "{DELIVERY,PRICE}", "text": review})
    assert result["prompt"] == want_prompt
    frame = result["frame"]
    want = predictor.predict_texts([want_prompt])[0]
    by_label = dict(zip(frame["label"], frame["probability"]))
    np.testing.assert_allclose([by_label[n] for n in predictor.label_names], want, atol=1e-6)
    assert list(frame["probability"]) == sorted(frame["probability"], reverse=True)
    spec = ui.default_spec(predictor.adapters[0])
    chosen = {n for n, p in zip(predictor.label_names, spec.decode(want[None])[0]) if p}
    assert set(frame.loc[frame["predicted"], "label"]) == chosen and chosen
    shown = "\n".join(m.value for m in at.markdown)
    for label in chosen:
        assert label in shown and predictor.adapters[0].descriptions[label] in shown
    assert at.dataframe[0].value.shape == (len(predictor.label_names), 5)


def test_app_csv_tab(adapter, predictor, monkeypatch, tmp_path):
    at = app_test(monkeypatch, "--adapter", str(adapter), "--batch-size", "4")
    df = pd.read_csv(SAMPLE_TEST).head(10)
    at.file_uploader[0].set_value(("test.csv", df.to_csv(index=False).encode(), "text/csv"))
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    out = at.session_state["csv_out"]
    assert out["rows"] == 10 and [b.label for b in at.get("download_button")] == ["probabilities CSV",
                                                                                 "submission CSV"]
    (tmp_path / "p.csv").write_text(out["probs"])
    (tmp_path / "in.csv").write_text(df.to_csv(index=False))
    from core.io import read_probs
    from infer.submit import targets

    ids, probs, cols = read_probs(tmp_path / "p.csv", predictor.label_names)
    want_ids, want = predictor.predict_csv(tmp_path / "in.csv")
    assert list(ids) == list(want_ids) and cols == predictor.label_names
    np.testing.assert_allclose(probs, want, atol=2e-6)
    sub = pd.read_csv(pd.io.common.StringIO(out["submission"]), dtype={"target": str}, keep_default_na=False)
    assert list(sub["target"]) == targets(ui.default_spec(predictor.adapters[0]).decode(want),
                                          predictor.label_names)
    # a CSV without the template's columns: one message, no result
    at.file_uploader[0].set_value(("bad.csv", df.drop(columns=["tags"]).to_csv(index=False).encode(), "text/csv"))
    at.run()
    assert any("lacks column(s) ['tags']" in e.value for e in at.error)


# --------------------------------------------------------------------------------------------------------------
# --api: a stub of `python -m infer serve` (POST /predict {"rows": [...]})
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def stub_server(adapter):
    from core.adapter import read_adapter

    names = read_adapter(adapter).label_names
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            rows = [{"probabilities": {n: (0.9 if i == 3 else 0.1) for i, n in enumerate(names)},
                     "labels": [names[3]]} for _ in body["rows"]]
            data = json.dumps({"rows": rows}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, names
    server.shutdown()


def test_api_client_and_app_against_a_stub_server(adapter, stub_server, monkeypatch):
    url, seen, names = stub_server
    at = app_test(monkeypatch, "--adapter", str(adapter), "--api", url)
    at.multiselect[0].set_value(["DELIVERY", "PRICE"])
    at.text_area[0].set_value("медленно")
    at.button[0].click().run()
    assert not at.error and not at.exception
    path, body = seen[-1]
    assert path == "/predict" and body["rows"][0]["tags"] == "DELIVERY,PRICE" and body["rows"][0]["text"] == "медленно"
    frame = at.session_state["result"]["frame"]
    assert frame["label"].iloc[0] == names[3] and list(frame.loc[frame["predicted"], "label"]) == [names[3]]

    spec = ui.default_spec(ui.Backend.create(ui.UIConfig(str(adapter), api=url)).ref)
    # class ids as in submissions, or no decoded set at all (then the UI decodes)
    _, d = ui.parse_api_rows([{"probabilities": [0.1] * len(names), "target": "3 7"}], names, spec)
    assert list(np.flatnonzero(d[0])) == [3, 7]
    _, d = ui.parse_api_rows([{"probabilities": [0.1] * 19 + [0.6]}], names, spec)
    assert list(np.flatnonzero(d[0])) == [19]
    with pytest.raises(InputError, match="no 'probabilities'"):
        ui.parse_api_rows([{"labels": []}], names, spec)
    with pytest.raises(InputError, match=r"--api http://127\.0\.0\.1:9: POST /predict failed"):
        ui.api_predict("http://127.0.0.1:9", [{"text": "x"}], timeout=5)


# --------------------------------------------------------------------------------------------------------------
# Once in a real browser: python -m infer ui + headless chromium (Playwright, system chromium)
# --------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (apt-get install -y chromium chromium-driver)")
def test_browser_submits_a_review_and_shows_the_predicted_classes(adapter, predictor, tmp_path):
    """The screenshot goes to $QLML_UI_SCREENSHOT when set (docs/ui.png was made so), else to tmp_path."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install`)")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "infer", "ui", "--adapter", str(adapter), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    review = "Долгая доставка, курьер опоздал"
    prompt = format_prompt(predictor.data.text_template, {"assessment": 3.0, "tags": "{DELIVERY}", "text": review})
    probs = predictor.predict_texts([prompt])
    chosen = [n for n, p in zip(predictor.label_names, ui.default_spec(predictor.adapters[0]).decode(probs)[0]) if p]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 1700})
            page.goto(f"http://127.0.0.1:{port}", timeout=120_000)
            page.get_by_label("assessment", exact=True).fill("3.00")
            page.get_by_label("assessment", exact=True).press("Enter")
            page.get_by_label("text", exact=True).fill(review)
            page.get_by_role("combobox").first.click()  # the tags multiselect
            page.get_by_role("option", name="DELIVERY").click()
            page.keyboard.press("Escape")
            page.get_by_role("button", name="Predict").click()
            page.get_by_text("Predicted classes").wait_for(timeout=120_000)
            chart = page.locator('[data-testid="stImage"] img').first  # the matplotlib bar chart
            chart.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=chart.element_handle())
            body = page.inner_text("body")
            for label in chosen:
                assert label in body and predictor.adapters[0].descriptions[label] in body
            shot = Path(os.environ.get("QLML_UI_SCREENSHOT") or tmp_path / "ui.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
