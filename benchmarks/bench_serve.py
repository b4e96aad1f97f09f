"""Throughput and latency of ``infer serve``, micro-batching on vs off, side by side (prints figures; not a test).

The model is loaded once and served twice in this process (uvicorn in a thread): with ``--max-batch-size`` (on) and
with a batch of 1 (off). At each concurrency level, ``--requests`` one-row requests (rows of ``--input``, cycled) are
sent by that many concurrent clients; printed: requests/s, p50/p95/p99 latency and the mean realised batch size
(rows per model call, from /metrics). The client runs in the same process as the server, so on a small CPU the
figures include its cost.

Usage:
    python -m benchmarks.bench_serve --adapter adapters/gemma-3-270m --requests 200 --concurrency 1,8,32
"""

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

import numpy as np

from core.cli import run_command, setup_logging
from core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)


class _Shared:
    """The loaded predictor without ``close`` (both servers use it; the caller frees it)."""

    def __init__(self, predictor):
        self.token_ids = predictor.token_ids
        self.predict_token_ids = predictor.predict_token_ids
        self.weights = predictor.weights


def _rows(input_csv: Path, fields: list[str]) -> list[dict]:
    import pandas as pd

    if not input_csv.is_file():
        raise InputError(f"{input_csv}: file not found (--input)")
    df = pd.read_csv(input_csv)
    missing = [f for f in fields if f not in df.columns]
    if missing:
        raise InputError(f"{input_csv}: missing column(s) {missing} (the adapter's data.text_template)")
    out = []
    for rec in df[fields].to_dict("records"):
        out.append({k: None if isinstance(v, float) and np.isnan(v) else v for k, v in rec.items()})
    if not out:
        raise InputError(f"{input_csv}: no rows")
    return out


def _batch_stats(url: str) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name in ("qlml_serve_batch_rows_sum", "qlml_serve_batch_rows_count"):
                values[s.name] = s.value
    return values.get("qlml_serve_batch_rows_sum", 0.0), values.get("qlml_serve_batch_rows_count", 0.0)


async def _load(url: str, rows: list[dict], requests: int, concurrency: int) -> tuple[float, list[float], int]:
    import httpx

    latencies: list[float] = []
    failed = 0
    counter = iter(range(requests))

    async def client_loop(client):
        nonlocal failed
        for i in counter:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/predict", json={"rows": [rows[i % len(rows)]]})
            latencies.append(time.perf_counter() - t0)
            failed += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, latencies, failed


def bench(adapter: str, input_csv: Path, requests: int, concurrency: list[int], max_batch_size: int,
          max_wait_ms: float, device=None, base_model=None) -> list[dict]:
    """Run the benchmark; returns one dict per (mode, concurrency) with the printed figures."""
    import httpx

    from core.data import template_fields
    from infer.predict import collect, load_refs
    from infer.serve.app import create_app, serve_in_thread
    from infer.serve.settings import Settings

    refs = collect([adapter])

    rows = _rows(input_csv, template_fields(refs[0].cfg.data.text_template))
    t0 = time.perf_counter()
    predictor = load_refs(refs, device=device, base_model=base_model)
    logger.info(f"loaded {len(refs)} adapter(s) on {predictor.device} in {time.perf_counter() - t0:.1f}s")
    shared = _Shared(predictor)
    results = []
    try:
        for mode, size in (("on", max_batch_size), ("off", 1)):
            settings = Settings(max_batch_size=size, max_wait_ms=max_wait_ms if size > 1 else 0,
                                max_queue=max(256, 2 * max(concurrency)))
            app = create_app(lambda r: shared, settings, refs)
            with serve_in_thread(app) as url:
                t_ready = time.perf_counter()
                while httpx.get(f"{url}/ready").status_code != 200:
                    if time.perf_counter() - t_ready > 300:
                        raise RuntimeError("server never got ready")
                    time.sleep(0.02)
                asyncio.run(_load(url, rows, min(requests, 2 * max(concurrency)), max(concurrency)))  # warm
                for c in concurrency:
                    s0, n0 = _batch_stats(url)
                    wall, lat, failed = asyncio.run(_load(url, rows, requests, c))
                    s1, n1 = _batch_stats(url)
                    ms = np.array(lat) * 1000
                    results.append({"batching": mode, "concurrency": c, "requests": requests, "failed": failed,
                                    "req_per_s": requests / wall, "p50_ms": float(np.percentile(ms, 50)),
                                    "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
                                    "mean_batch": (s1 - s0) / (n1 - n0) if n1 > n0 else float("nan")})
    finally:
        predictor.close()
    return results


def print_table(results: list[dict], max_batch_size: int) -> None:
    by = {(r["batching"], r["concurrency"]): r for r in results}
    levels = sorted({r["concurrency"] for r in results})
    head = f"{'concurrency':>11} | " + " | ".join(
        f"{'batching ' + m:^44}" for m in (f"on (max {max_batch_size})", "off (max 1)"))
    sub = f"{'':>11} | " + " | ".join(f"{'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>7}"
                                       for _ in range(2))
    print(head)
    print(sub)
    for c in levels:
        cells = []
        for m in ("on", "off"):
            r = by[(m, c)]
            cells.append(f"{r['req_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['p99_ms']:8.1f} "
                         f"{r['mean_batch']:7.2f}")
        print(f"{c:>11} | " + " | ".join(cells))
    failed = sum(r["failed"] for r in results)
    if failed:
        print(f"warning: {failed} request(s) did not answer 200")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter folder, run folder or Hub id already pulled")
    p.add_argument("--input", type=Path, default=REPO / "data" / "sample_test.csv",
                   help="CSV with the template's columns (rows are cycled)")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level and mode")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--max-batch-size", type=int, default=32, help="batch size with micro-batching on")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--device")
    p.add_argument("--base-model")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        if not levels or min(levels) < 1 or args.requests < 1:
            raise ValueError
    except ValueError:
        print("error: --concurrency must be positive integers and --requests >= 1", file=sys.stderr)
        return 2
    setup_logging()

    def body() -> int:
        results = bench(args.adapter, args.input, args.requests, levels, args.max_batch_size, args.max_wait_ms,
                        args.device, args.base_model)
        print_table(results, args.max_batch_size)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
