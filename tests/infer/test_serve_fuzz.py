"""A property-based fuzz of ``POST /predict`` through real HTTP on a tiny trained model (issue 34).

Hypothesis draws request bodies (JSON of every type where a row's fields go, strings with lone surrogates and
other unicode, huge and empty strings, deep nesting, missing and extra fields, not JSON at all) and content types.
Every answer is below 500, ``/ready`` stays 200, and a good request after each drawn one is answered with 200.
The number of cases tried is printed (``pytest -s``); ~60 s of CI on two cores.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import wait_ready

from infer.serve.app import create_app, serve_in_thread
from infer.serve.settings import Settings

MAX_EXAMPLES = 150
GOOD = {"rows": [{"assessment": 4, "tags": ["DELIVERY"], "text": "курьер опоздал"}]}

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
chars = st.one_of(st.characters(exclude_categories=()), surrogates)
strings = st.one_of(
    st.text(chars, max_size=40),
    st.just(""),
    st.builds(lambda c, n: c * n, st.text(chars, min_size=1, max_size=3), st.integers(1_000, 400_000)),  # huge
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400),
                    st.floats(allow_nan=True, allow_infinity=True), strings)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(strings, inner, max_size=4)),
                           max_leaves=12)
field_names = st.one_of(st.sampled_from(["assessment", "tags", "text", "index", "rows", "", "text "]), strings)
printable = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # any encodable unicode
valid_rows = st.fixed_dictionaries({"assessment": st.one_of(st.integers(0, 5), st.floats(0, 5), st.just("4")),
                                    "tags": st.one_of(st.none(), st.lists(st.text(max_size=20), max_size=5)),
                                    "text": printable})
rows = st.one_of(
    valid_rows,
    st.fixed_dictionaries({}, optional={"assessment": json_values, "tags": json_values, "text": json_values}),
    st.fixed_dictionaries({"assessment": st.one_of(st.integers(0, 5), json_values),
                           "tags": st.one_of(st.lists(strings, max_size=5), json_values),
                           "text": strings},
                          optional={"extra": json_values}),
    st.dictionaries(field_names, json_values, max_size=5),
    json_values,
)


def nested(depth: int, opener: str, closer: str, inner: str = "1") -> str:
    return opener * depth + inner + closer * depth


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 200_000).map(lambda d: nested(d, "[", "]").encode()),
    st.integers(1, 100_000).map(lambda d: ('{"rows": ' + nested(d, "[", "]") + "}").encode()),
    st.integers(1, 100_000).map(lambda d: nested(d, '{"a": ', "}").encode()),
    st.sampled_from([b"", b"null", b"{", b'{"rows": [}', b'{"rows": NaN}', b'{"rows": [{"text": "a"}]} trailing',
                     b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), json.dumps(GOOD).encode("utf-16")]),
)
json_bodies = st.one_of(
    st.builds(lambda r: {"rows": r}, st.lists(rows, max_size=70)),
    st.builds(lambda r: {"rows": r}, st.lists(valid_rows, min_size=1, max_size=8)),  # reach the model
    st.builds(lambda r, extra: {"rows": r, **extra}, st.lists(rows, max_size=3),
              st.dictionaries(field_names, json_values, max_size=3)),
    json_values,
).map(lambda value: json.dumps(value, ensure_ascii=True).encode())  # ascii escapes: lone surrogates reach the server
other_content_types = st.one_of(
    st.sampled_from(["application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
                     "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
                     "application/json; charset=latin-1", "application/jsonx", "", None]),
    # Printable ASCII; stripped because a header value may not begin or end with a space (httpx refuses to send it).
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip),
)
# Mostly JSON, so that most cases reach the body's parsing and validation rather than the 415.
content_types = st.integers(0, 9).flatmap(lambda i: st.just("application/json") if i < 7 else other_content_types)


@pytest.fixture(scope="module")
def url(tiny_run):
    app = create_app(settings=Settings(adapters=[str(tiny_run)]))
    with serve_in_thread(app) as base:
        wait_ready(base, timeout=300)
        yield base


def test_fuzz_predict_never_5xx_and_stays_ready(url):
    tried, statuses = [], {}
    good = json.dumps(GOOD).encode()
    with httpx.Client(base_url=url, timeout=60) as client:

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
        @given(body=st.one_of(json_bodies, raw_bodies), content_type=content_types)
        def case(body: bytes, content_type: str | None):
            headers = {} if content_type is None else {"Content-Type": content_type}
            r = client.post("/predict", content=body, headers=headers)
            tried.append(1)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (r.status_code, r.text[:500], body[:300], content_type)
            assert client.get("/ready").status_code == 200
            after = client.post("/predict", content=good, headers={"Content-Type": "application/json"})
            assert after.status_code == 200, after.text[:500]
            assert len(after.json()["rows"]) == 1

        t0 = time.perf_counter()
        case()
    print(f"\nfuzz of POST /predict: {len(tried)} cases in {time.perf_counter() - t0:.1f}s, "
          f"statuses {dict(sorted(statuses.items()))}")
    assert len(tried) >= MAX_EXAMPLES // 2
