"""infer.serve through real HTTP (uvicorn on a free loopback port in a thread, httpx): every endpoint, the input
limits, micro-batching, the full queue, auth, model errors; and the tiny trained run served against
``infer.predict.predict`` on the same rows. Most tests use a fake predictor (no model); the last ones the tiny run."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE_DATA, SAMPLE_DECODE, SAMPLE_TEMPLATE

from core.adapter import AdapterRef
from core.config import RunConfig
from core.data import format_prompt
from core.decoding import adapter_default_spec
from core.errors import InputError
from core.thresholds import ThresholdSpec
from infer.serve.app import create_app, serve_in_thread
from infer.serve.settings import Settings

REPO = Path(__file__).resolve().parents[2]
LABELS = [f"trend_id_res{i}" for i in range(20)]
ROW = {"assessment": 4.0, "tags": ["DELIVERY"], "text": "Курьер опоздал"}


def fake_refs(n: int = 1) -> list[AdapterRef]:
    cfg = RunConfig.from_dict({"data": dict(SAMPLE_DATA), "decode": dict(SAMPLE_DECODE)})
    return [AdapterRef(spec=f"fake{i}", folder=Path(f"fake/fold_{i}/last"), cfg=cfg, label_names=list(LABELS),
                       descriptions={"trend_id_res0": "Долгая доставка"}, weight=1.0 / n) for i in range(n)]


class FakePredictor:
    """Probabilities from the prompt's length; optionally blocks (on ``gate``) or fails (prompt containing boom)."""

    def __init__(self, refs, gate: threading.Event | None = None):
        self.refs = refs
        self.gate = gate
        self.entered = threading.Event()
        self.texts: list[str] = []
        self.calls: list[int] = []

    def weights(self):
        return np.array([r.weight for r in self.refs])

    def token_ids(self, texts, max_length=None):
        self.texts += list(texts)
        return [[len(t) % 97, *(1 for _ in t.split())] for t in texts]

    def predict_token_ids(self, token_ids, adapter=0, batch_size=64):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if any(t[0] == -1 for t in token_ids):
            raise RuntimeError("boom inside the model")
        self.calls.append(len(token_ids))
        return np.array([[((t[0] + j) % 10) / 10 + 0.05 for j in range(len(LABELS))] for t in token_ids])


class BoomPredictor(FakePredictor):
    """Fails the batch that contains the text 'boom'."""

    def token_ids(self, texts, max_length=None):
        return [[-1] if "boom" in t else ids for t, ids in zip(texts, super().token_ids(texts, max_length))]


def wait_ready(url: str, headers=None, timeout: float = 60) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if httpx.get(f"{url}/ready", headers=headers).status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("server never got ready")


def served(settings=None, predictor_cls=FakePredictor, refs=None, **kw):
    refs = refs or fake_refs()
    holder = {}

    def factory(r):
        holder["p"] = predictor_cls(r, **kw)
        return holder["p"]

    app = create_app(factory, settings or Settings(), refs)
    return app, holder


@pytest.fixture
def fake_server():
    app, holder = served(Settings(no_empty_text=True, max_rows=4, max_text_chars=50, max_body_bytes=2000))
    with serve_in_thread(app) as url:
        wait_ready(url)
        yield url, holder["p"]


def metric(url: str, name: str, headers=None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=headers).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


# --------------------------------------------------------------------------------------------------------------
# Endpoints and responses (fake predictor)
# --------------------------------------------------------------------------------------------------------------


def test_endpoints_and_response(fake_server):
    url, pred = fake_server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json() == {"ready": True}
    info = httpx.get(f"{url}/info").json()
    assert info["fields"] == ["assessment", "tags", "text"] and info["text_field"] == "text"
    assert [x["id"] for x in info["labels"]] == LABELS and info["labels"][0]["name"] == "Долгая доставка"
    assert info["thresholds"]["source"] == "default" and info["thresholds"]["fallback"] == 19
    assert "fastapi" in info["versions"] and info["adapters"][0]["spec"] == "fake0"

    r = httpx.post(f"{url}/predict", json={"rows": [ROW, {**ROW, "tags": None, "assessment": 1}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapters"] == ["fold_0/last"] and len(body["rows"]) == 2
    row = body["rows"][0]
    assert [p["id"] for p in row["probabilities"]] == LABELS
    assert row["probabilities"][0]["name"] == "Долгая доставка" and row["probabilities"][1]["name"] is None
    probs = np.array([[p["probability"] for p in r["probabilities"]] for r in body["rows"]])
    expect = adapter_default_spec(fake_refs()[0]).decode(probs)
    assert [r["labels"] for r in body["rows"]] == [[LABELS[j] for j in np.flatnonzero(y)] for y in expect]
    assert row["class_ids"] == [int(n.removeprefix("trend_id_res")) for n in row["labels"]]
    # The prompt is the training formatter's: a JSON list formats like the CSV's set literal.
    csv_row = {"assessment": 4.0, "tags": "{DELIVERY}", "text": "Курьер опоздал"}
    assert format_prompt(SAMPLE_TEMPLATE, csv_row) in pred.texts
    # The training CSV reads assessment as floats: a JSON 1 formats as the CSV's 1.0 (no train/serve skew).
    assert format_prompt(SAMPLE_TEMPLATE, {"assessment": 1.0, "tags": None, "text": "Курьер опоздал"}) in pred.texts

    metrics = httpx.get(f"{url}/metrics").text
    for name in ("qlml_serve_requests_total", "qlml_serve_requests_in_flight", "qlml_serve_request_seconds_bucket",
                 "qlml_serve_queue_wait_seconds_bucket", "qlml_serve_batch_rows_bucket", "qlml_serve_rows_total",
                 "qlml_serve_model_load_seconds"):
        assert name in metrics
    assert 'qlml_serve_requests_total{endpoint="/predict",status="200"} 1.0' in metrics
    assert metric(url, "qlml_serve_rows_total") == 2  # the warm-up row is not counted


@pytest.mark.parametrize("body, status, field", [
    (b"not json", 422, "body"),
    (b"[1, 2]", 422, "body"),
    (b'{"rows": []}', 422, "rows"),
    (b'{"rows": [{"assessment": 4, "tags": null}]}', 422, "rows.0.text"),                   # missing field
    (b'{"rows": [{"assessment": 4, "tags": null, "text": "a", "index": 7}]}', 422, "rows.0.index"),  # not used
    (b'{"rows": [{"assessment": 4, "tags": null, "text": "a"}, {"assessment": {}, "tags": null, "text": "b"}]}',
     422, "rows.1.assessment"),
    (b'{"rows": [{"assessment": 4, "tags": [1, 2], "text": "a"}]}', 422, "rows.0.tags"),
    (b'{"rows": [{"assessment": true, "tags": null, "text": "a"}]}', 422, "rows.0.assessment"),
    (b'{"rows": [{"assessment": 4, "tags": null, "text": "a"}, {"assessment": 4, "tags": null, "text": "  "}]}',
     422, "rows.1.text"),                                                                   # --no-empty-text
    (b'{"rows": [{"assessment": 4, "tags": null, "text": null}]}', 422, "rows.0.text"),
    (json.dumps({"rows": [{**ROW, "text": "x" * 51}]}).encode(), 422, "rows.0.text"),      # --max-text-chars
    (json.dumps({"rows": [ROW] * 5}).encode(), 413, "rows"),                               # --max-rows
    (json.dumps({"rows": [{**ROW, "tags": ["A" * 40] * 60}]}).encode(), 413, "body"),     # --max-body-bytes
    (b'{"rows": [{"assessment": 4, "tags": null, "text": "a"}], "extra": 1}', 422, "extra"),
])
def test_bad_input_is_a_json_error_naming_the_field(fake_server, body, status, field):
    url, _ = fake_server
    r = httpx.post(f"{url}/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field
    if field != "body":
        assert field in err["error"]
    if field.startswith("rows."):
        assert err["row"] == int(field.split(".")[1])
    assert httpx.post(f"{url}/predict", json={"rows": [ROW]}).status_code == 200  # still serving


def test_body_limit_without_content_length(fake_server):
    url, _ = fake_server

    def chunks():
        yield b'{"rows": [{"assessment": 4, "tags": null, "text": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}]}'

    r = httpx.post(f"{url}/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_ready_503_while_loading_and_when_loading_fails():
    gate = threading.Event()

    def slow(refs):
        assert gate.wait(30)
        return FakePredictor(refs)

    with serve_in_thread(create_app(slow, Settings(), fake_refs())) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.get(f"{url}/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{url}/predict", json={"rows": [ROW]})
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        gate.set()
        wait_ready(url)

    def broken(refs):
        raise OSError("no such base model")

    with serve_in_thread(create_app(broken, Settings(), fake_refs())) as url:
        t0 = time.perf_counter()
        while "error" not in (r := httpx.get(f"{url}/ready")).json() and time.perf_counter() - t0 < 10:
            time.sleep(0.02)
        assert r.status_code == 503 and "no such base model" in r.json()["error"]
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/predict", json={"rows": [ROW]}).status_code == 503


def test_model_error_is_a_500_with_an_id_and_the_next_request_works(caplog):
    app, _ = served(predictor_cls=BoomPredictor)
    with serve_in_thread(app) as url:
        wait_ready(url)
        r = httpx.post(f"{url}/predict", json={"rows": [{**ROW, "text": "boom"}]})
        assert r.status_code == 500 and len(r.json()["error_id"]) == 12
        assert r.json()["error_id"] in caplog.text and "boom inside the model" in caplog.text
        r = httpx.post(f"{url}/predict", json={"rows": [ROW]})
        assert r.status_code == 200 and len(r.json()["rows"]) == 1
        assert metric(url, "qlml_serve_model_errors_total") == 1


def pass_warm_up(url, holder, gate):
    """The warm-up batch blocks on the gate too: release it once the predictor is in, then close the gate."""
    t0 = time.perf_counter()
    while "p" not in holder or not holder["p"].entered.is_set():
        assert time.perf_counter() - t0 < 30
        time.sleep(0.01)
    gate.set()
    wait_ready(url)
    gate.clear()
    holder["p"].entered.clear()


def test_full_queue_answers_429():
    gate = threading.Event()
    app, holder = served(Settings(max_queue=1, max_batch_size=1, max_wait_ms=0), gate=gate)
    with serve_in_thread(app) as url:
        pass_warm_up(url, holder, gate)
        results = {}

        def post(key):
            results[key] = httpx.post(f"{url}/predict", json={"rows": [ROW]}, timeout=30)

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert holder["p"].entered.wait(10)  # the worker holds the first request
        second = threading.Thread(target=post, args=("second",))
        second.start()
        t0 = time.perf_counter()
        while app.state.engine.queue.qsize() < 1:  # the second waits in the queue
            assert time.perf_counter() - t0 < 10
            time.sleep(0.01)
        r = httpx.post(f"{url}/predict", json={"rows": [ROW]})
        assert r.status_code == 429 and "retry" in r.json()["error"]
        gate.set()
        first.join(10)
        second.join(10)
        assert results["first"].status_code == 200 and results["second"].status_code == 200


def test_timeout_is_a_504_and_the_worker_goes_on():
    gate = threading.Event()
    app, holder = served(Settings(request_timeout_s=0.3, max_batch_size=1, max_wait_ms=0), gate=gate)
    with serve_in_thread(app) as url:
        pass_warm_up(url, holder, gate)
        results = {}
        first = threading.Thread(target=lambda: results.update(a=httpx.post(f"{url}/predict", json={"rows": [ROW]})))
        first.start()
        assert holder["p"].entered.wait(10)
        r = httpx.post(f"{url}/predict", json={"rows": [ROW]})  # queued behind the first, gives up
        assert r.status_code == 504 and "0.3s" in r.json()["error"]
        first.join(10)
        assert results["a"].status_code == 504
        gate.set()
        assert httpx.post(f"{url}/predict", json={"rows": [ROW]}).status_code == 200


def test_micro_batching_merges_concurrent_requests():
    app, holder = served(Settings(max_batch_size=16, max_wait_ms=200))
    with serve_in_thread(app) as url:
        wait_ready(url)

        async def burst():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(f"{url}/predict", json={"rows": [{**ROW, "text": f"t {i}"}]})
                                              for i in range(12)))

        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses)
        assert max(holder["p"].calls) > 1 and sum(holder["p"].calls[1:]) == 12
        assert metric(url, "qlml_serve_batch_rows_sum") / metric(url, "qlml_serve_batch_rows_count") > 1


def test_token_budget_splits_batches():
    app, holder = served(Settings(max_batch_size=64, max_batch_tokens=8, max_wait_ms=200))
    with serve_in_thread(app) as url:
        wait_ready(url)

        async def burst():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(f"{url}/predict", json={"rows": [ROW]}) for _ in range(6)))

        assert all(r.status_code == 200 for r in asyncio.run(burst()))
        # Each row is 9 "tokens" here (fake tokenizer: one per word + 1), over the budget of 8: one row a batch.
        assert holder["p"].calls[1:] == [1] * 6


def test_auth(monkeypatch, caplog):
    monkeypatch.setenv("QLML_TEST_KEY", "s3cret-key")
    app, _ = served(Settings(api_key_env="QLML_TEST_KEY"))
    good = {"Authorization": "Bearer s3cret-key"}
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/ready", "/info", "/metrics"):
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(f"{url}/predict", json={"rows": [ROW]})
        assert r.status_code == 401 and r.json()["field"] == "Authorization"
        wait_ready(url, headers=good)
        assert httpx.post(f"{url}/predict", json={"rows": [ROW]}, headers=good).status_code == 200
        assert httpx.get(f"{url}/metrics", headers=good).status_code == 200
    assert "s3cret-key" not in caplog.text
    monkeypatch.delenv("QLML_TEST_KEY")
    with pytest.raises(InputError, match="QLML_TEST_KEY"):
        create_app(FakePredictor, Settings(api_key_env="QLML_TEST_KEY"), fake_refs())


def test_thresholds_file_decodes_in_its_label_order(tmp_path):
    spec = ThresholdSpec(tuple(reversed(LABELS)), start=0.9, stop=0.5, step=0.1, fallback=None)
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(spec.to_dict()))
    app, _ = served(Settings(thresholds=str(path)))
    with serve_in_thread(app) as url:
        wait_ready(url)
        info = httpx.get(f"{url}/info").json()
        assert info["thresholds"]["source"] == "thresholds.json" and info["thresholds"]["start"] == 0.9
        row = httpx.post(f"{url}/predict", json={"rows": [ROW]}).json()["rows"][0]
    probs = np.array([p["probability"] for p in row["probabilities"]])
    top = probs.max()
    assert row["labels"] == [n for n, p in zip(LABELS, probs) if p > max(t for t in spec.steps if t < top)]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(ThresholdSpec(("a", "b")).to_dict() | {"fallback": None}))
    with pytest.raises(InputError, match="different label set"):
        create_app(FakePredictor, Settings(thresholds=str(bad)), fake_refs())


def test_settings_and_cli_errors(tmp_path, capsys):
    from infer.__main__ import main

    with pytest.raises(InputError, match="--max-batch-size"):
        create_app(FakePredictor, Settings(max_batch_size=0), fake_refs())
    with pytest.raises(InputError, match="--text-field 'review'"):
        create_app(FakePredictor, Settings(text_field="review"), fake_refs())
    assert main(["serve", "--adapter", str(tmp_path / "nope")]) == 2
    assert "adapter" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# The tiny trained run: the served probabilities are infer.predict's
# --------------------------------------------------------------------------------------------------------------


def json_row(record: dict, as_list: bool) -> dict:
    """A CSV record as a client would send it (NaN -> null; set literal tags -> a JSON list when ``as_list``)."""
    out = {}
    for k in ("assessment", "tags", "text"):
        v = record[k]
        v = None if isinstance(v, float) and np.isnan(v) else v
        if k == "tags" and as_list and isinstance(v, str) and v.startswith("{"):
            v = [t for t in v[1:-1].split(",") if t]
        out[k] = v
    return out


def test_concurrent_requests_match_infer_predict(tiny_run, tmp_path):
    from infer.predict import predict

    df = pd.read_csv(REPO / "data" / "sample_test.csv").head(32)
    csv = tmp_path / "rows.csv"
    df.to_csv(csv, index=False)
    predict([str(tiny_run)], csv, tmp_path / "probs.csv", progress=False)
    expect = pd.read_csv(tmp_path / "probs.csv").drop(columns="index").to_numpy()

    app = create_app(settings=Settings(adapters=[str(tiny_run)], max_wait_ms=100, max_batch_size=16))
    with serve_in_thread(app) as url:
        wait_ready(url)

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(f"{url}/predict", json={"rows": [json_row(rec, i % 2 == 0)]})
                                              for i, rec in enumerate(df.to_dict("records"))))

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 32
        got = np.array([[p["probability"] for p in r.json()["rows"][0]["probabilities"]] for r in responses])
        np.testing.assert_allclose(got, expect, atol=1e-5)
        assert responses[0].json()["adapters"] == ["fold_0/last", "fold_1/last"]
        assert metric(url, "qlml_serve_batch_rows_sum") == 32  # the warm-up batch is not counted
        assert 32 / metric(url, "qlml_serve_batch_rows_count") > 1
        assert metric(url, "qlml_serve_model_load_seconds") > 0


def test_bench_serve_smoke(tiny_run, capsys):
    from benchmarks.bench_serve import main

    assert main(["--adapter", str(tiny_run / "fold_0" / "last"), "--requests", "8", "--concurrency", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "req/s" in out and "p99" in out and "batching on" in out and "batching off" in out
