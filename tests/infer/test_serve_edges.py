"""Hostile and careless requests to ``infer serve`` (issue 34), through real HTTP on a fake predictor: each gets a
clear 4xx naming the row and field, never a 5xx, and the next good request is answered. Also the connection
timeouts, the token budget, and /info revealing no file-system path."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from test_serve import ROW, fake_refs, metric, served, wait_ready

from infer.serve.app import serve_in_thread
from infer.serve.settings import Settings

JSON = {"Content-Type": "application/json"}


def body(*rows: str) -> bytes:
    """A request body from raw row JSON (so that escapes like \\ud800 reach the server as they are written)."""
    return ('{"rows": [' + ", ".join(rows) + "]}").encode()


GOOD = '{"assessment": 4, "tags": null, "text": "a"}'


@pytest.fixture(scope="module")
def server():
    app, holder = served(Settings(max_rows=8, max_text_chars=200, max_field_chars=100))
    with serve_in_thread(app) as url:
        wait_ready(url)
        yield url, holder


HOSTILE = [
    # Text the tokenizer cannot encode: a lone surrogate (422 naming row and field, not a 500).
    (body('{"assessment": 4, "tags": null, "text": "x\\ud800y"}'), 422, "rows.0.text"),
    (body(GOOD, '{"assessment": 4, "tags": ["A", "x\\udfffy"], "text": "a"}'), 422, "rows.1.tags"),
    (body('{"assessment": 4, "tags": "\\ud83d", "text": "a"}'), 422, "rows.0.tags"),
    (body('{"assessment": 4, "tags": null, "text": "a", "k\\ud800": 1}'), 422, None),
    (body('{"assessment": "\\ud800", "tags": null, "text": "a"}'), 422, "rows.0.assessment"),
    # Deep nesting: a depth limit, not a RecursionError.
    (b"[" * 100_000 + b"]" * 100_000, 422, "body"),
    (b'{"rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422, "body"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, 422, "body"),
    (body('{"assessment": 4, "tags": [[[["A"]]]], "text": "a"}'), 422, "body"),
    # Every string field is bounded.
    (body(f'{{"assessment": 4, "tags": ["{"A" * 101}"], "text": "a"}}'), 422, "rows.0.tags"),
    (body(f'{{"assessment": 4, "tags": {json.dumps(["AB"] * 40)}, "text": "a"}}'), 422, "rows.0.tags"),
    (body(f'{{"assessment": 4, "tags": "{"B" * 500}", "text": "a"}}'), 422, "rows.0.tags"),
    (body(f'{{"assessment": "{"9" * 900}", "tags": null, "text": "a"}}'), 422, "rows.0.assessment"),
    (body(GOOD, f'{{"assessment": 4, "tags": null, "text": "{"x" * 201}"}}'), 422, "rows.1.text"),
    # A numeric field of the training data holds a number.
    (body('{"assessment": "abc", "tags": null, "text": "a"}'), 422, "rows.0.assessment"),
    (body('{"assessment": 4, "tags": null, "text": "a"}', '{"assessment": "4,5", "tags": null, "text": "a"}'),
     422, "rows.1.assessment"),
    (body('{"assessment": ["4"], "tags": null, "text": "a"}'), 422, "rows.0.assessment"),
    (body('{"assessment": NaN, "tags": null, "text": "a"}'), 422, "body"),
    (body('{"assessment": Infinity, "tags": null, "text": "a"}'), 422, "body"),
    (body('{"assessment": -Infinity, "tags": null, "text": "a"}'), 422, "body"),
    (body('{"assessment": 1e999, "tags": null, "text": "a"}'), 422, "rows.0.assessment"),
    (body('{"assessment": "inf", "tags": null, "text": "a"}'), 422, "rows.0.assessment"),
    (body('{"assessment": "nan", "tags": null, "text": "a"}'), 422, "rows.0.assessment"),
    (body('{"assessment": false, "tags": null, "text": "a"}'), 422, "rows.0.assessment"),
    # A list field is a list of strings.
    (body('{"assessment": 4, "tags": [1], "text": "a"}'), 422, "rows.0.tags"),
    (body('{"assessment": 4, "tags": [null], "text": "a"}'), 422, "rows.0.tags"),
    (body('{"assessment": 4, "tags": {"A": 1}, "text": "a"}'), 422, "rows.0.tags"),
    (body('{"assessment": 4, "tags": [["A"]], "text": "a"}'), 422, "rows.0.tags"),
    (body('{"assessment": 4, "tags": null, "text": ["a"]}'), None, None),  # a list is allowed text (joined)
    # Not JSON / odd encodings.
    (b"\xff\xfe{}", 422, "body"),
    (b'{"rows": [' + b"1," * 5 + b"1]}", 422, None),
    (b"", 422, "body"),
    (b"null", 422, "body"),
    (b'"rows"', 422, "body"),
]


@pytest.mark.parametrize("raw, status, field", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_body_is_a_clear_4xx(server, raw, status, field):
    url, _ = server
    r = httpx.post(f"{url}/predict", content=raw, headers=JSON, timeout=30)
    if status is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == status, r.text
        err = r.json()
        if field is not None:
            assert err["field"] == field, err
        if field and field.startswith("rows."):
            assert err["row"] == int(field.split(".")[1]) and field in err["error"]
    assert metric(url, "qlml_serve_model_errors_total") == 0
    assert httpx.post(f"{url}/predict", json={"rows": [ROW]}).status_code == 200  # still serving


def test_numbers_format_as_the_training_csv_did(server):
    """The sample training CSV reads assessment as floats: 4, 4.0 and "4" are the same prompt, its ``4.0``."""
    url, holder = server
    pred = holder["p"]
    seen = []
    for value in (4, 4.0, "4", " 4.0 "):
        before = len(pred.texts)
        r = httpx.post(f"{url}/predict", json={"rows": [{**ROW, "assessment": value, "text": "skew"}]})
        assert r.status_code == 200, r.text
        seen.append(pred.texts[before])
        # the same text in the answer's cache key: equal probabilities
    assert len(set(seen)) == 1 and "assesment: 4.0\n" in seen[0]
    r = httpx.post(f"{url}/predict", json={"rows": [{**ROW, "assessment": None, "text": "skew"}]})
    assert r.status_code == 200 and "assesment: \n" in pred.texts[-1]


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/jsonx", "text/json"])
def test_body_must_be_json(server, ctype):
    url, _ = server
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = httpx.post(f"{url}/predict", content=json.dumps({"rows": [ROW]}).encode(), headers=headers)
    assert r.status_code == 415 and r.json()["field"] == "Content-Type"
    ok = httpx.post(f"{url}/predict", content=json.dumps({"rows": [ROW]}).encode(),
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_token_budget_is_a_413():
    # Fake tokens: one per word + 1 (9 for ROW); 3 rows x 9 = 27 > 20.
    app, _ = served(Settings(max_request_tokens=20))
    with serve_in_thread(app) as url:
        wait_ready(url)
        r = httpx.post(f"{url}/predict", json={"rows": [ROW] * 3})
        assert r.status_code == 413 and "--max-request-tokens" in r.json()["error"], r.text
        assert r.json()["field"] == "rows"
        assert httpx.post(f"{url}/predict", json={"rows": [ROW] * 2}).status_code == 200
        assert metric(url, "qlml_serve_model_errors_total") == 0
        assert httpx.get(f"{url}/info").json()["limits"]["max_request_tokens"] == 20


def test_info_and_errors_show_no_path(tmp_path):
    refs = fake_refs()
    refs[0].spec = str(tmp_path / "secret" / "run")
    refs[0].folder = tmp_path / "secret" / "run" / "fold_0" / "last"
    refs[0].cfg.model.name_or_path = str(tmp_path / "secret" / "base-model")
    refs[0].info = {}
    app, _ = served(refs=refs)
    with serve_in_thread(app) as url:
        wait_ready(url)
        info = httpx.get(f"{url}/info").text
        answer = httpx.post(f"{url}/predict", json={"rows": [ROW]}).text
        assert "secret" not in info and str(tmp_path) not in info, info
        assert "secret" not in answer and "base-model" in answer

    def broken(r):
        raise OSError(f"{tmp_path}/secret/base-model/config.json: no such file")

    from infer.serve.app import create_app

    with serve_in_thread(create_app(broken, Settings(), fake_refs())) as url:
        t0 = time.perf_counter()
        while "error" not in (r := httpx.get(f"{url}/ready")).json() and time.perf_counter() - t0 < 10:
            time.sleep(0.02)
        assert r.status_code == 503 and "config.json" in r.text and "secret" not in r.text
        r = httpx.post(f"{url}/predict", json={"rows": [ROW]})
        assert r.status_code == 503 and "secret" not in r.text


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_header_keep_alive_and_body_timeouts():
    app, _ = served(Settings(header_timeout_s=0.5, keep_alive_s=1, body_timeout_s=0.5))
    with serve_in_thread(app) as url:
        wait_ready(url)
        host, port = url.removeprefix("http://").split(":")
        # Half-open: a connection that never sends its headers is closed.
        silent = socket.create_connection((host, int(port)))
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        t0 = time.perf_counter()
        assert _closed_within(silent, 5) and _closed_within(slow, 5)
        assert time.perf_counter() - t0 < 4
        # Idle keep-alive after a full request: closed.
        keep = socket.create_connection((host, int(port)))
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in keep.recv(4096)
        assert _closed_within(keep, 5)
        # A body that never arrives: 408.
        part = socket.create_connection((host, int(port)))
        part.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"rows\"")
        part.settimeout(5)
        assert b" 408 " in part.recv(4096)
        for s in (silent, slow, keep, part):
            s.close()
        assert httpx.post(f"{url}/predict", json={"rows": [ROW]}).status_code == 200


def test_serve_cli_flags_reach_settings():
    import argparse

    from infer.commands.serve import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--adapter", "a", "--max-field-chars", "7", "--max-request-tokens", "9",
                              "--header-timeout-s", "2", "--keep-alive-s", "3", "--body-timeout-s", "4"])
    s = settings_from_args(args)
    assert (s.max_field_chars, s.max_request_tokens, s.header_timeout_s, s.keep_alive_s, s.body_timeout_s) == (
        7, 9, 2, 3, 4)


