"""``python -m infer serve``: an HTTP API over trained adapter(s), with micro-batching.

One process holds the 4-bit base model once and its adapters (the same :class:`infer.predict.Predictor` as
``infer predict``: a run folder's folds are averaged, ``--weights`` weight an ensemble). Concurrent requests go into a
bounded queue; one worker thread runs the model on micro-batches of rows, flushed at ``--max-batch-size`` rows, at
the ``--max-batch-tokens`` budget (rows x longest row, as padded) or after ``--max-wait-ms``. A full queue answers 429.

Endpoints:
    POST /predict   {"rows": [{"assessment": 4, "tags": ["DELIVERY"], "text": "..."}]} -> probabilities + labels
    GET  /health    the process is alive (never needs the API key)
    GET  /ready     200 once the model is loaded and a warm-up batch ran, 503 before (or if loading failed)
    GET  /info      labels, thresholds, adapters, versions, limits
    GET  /metrics   Prometheus text format

The row fields are exactly the fields of the adapter's ``data.text_template``; each row is formatted with
:func:`core.data.format_prompt`, the formatter training used (a list like ``["DELIVERY", "PRICE"]`` formats as the
CSV's ``{DELIVERY,PRICE}`` does). Numbers format as given: the DLS CSV's assessment column reads as floats (``4.0``).

The package, one concern a module:
    settings   :class:`~infer.serve.settings.Settings`, everything ``serve`` is configured with (the CLI flags)
    schema     what a request holds and a response says (pydantic), and the JSON errors
    batcher    the bounded queue and the one model thread that runs micro-batches
    metrics    the Prometheus metrics
    app        :func:`~infer.serve.app.create_app`: the routes (plain functions), the API key as a dependency,
               and :func:`~infer.serve.app.serve_in_thread` for tests and benchmarks
The command is :mod:`infer.commands.serve`.

Usage:
    python -m infer serve --adapter adapters/gemma-3-270m --thresholds thresholds.json --port 8000
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
        -d '{"rows": [{"assessment": 4.0, "tags": ["DELIVERY"], "text": "Курьер опоздал"}]}'

Python:
    from infer.serve.app import create_app, serve_in_thread
    from infer.serve.settings import Settings
"""
