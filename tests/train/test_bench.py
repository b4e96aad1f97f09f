"""The training benchmark runs end to end on the CPU (tiny Gemma-2 shape): GPU sessions are rare, so the script
they run must not rot in between. Figures are not asserted (a benchmark prints them; it is not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainkit import ROOT, SAMPLE_TRAIN

pytestmark = pytest.mark.slow


def test_bench_reference_and_toolkit_run_on_a_tiny_shape(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "train.bench", "--models", "tiny-gemma2", "--profiles", "reference,toolkit",
         "--steps", "2", "--warmup", "1", "--data", str(SAMPLE_TRAIN), "--shapes-dir", str(tmp_path / "shapes"),
         "--out", str(out), "--set", "train.max_tokens_per_micro_batch=256"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["recipe"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"reference", "toolkit"}
    for r in results.values():
        assert "error" not in r, r
        assert r["steps_timed"] == 2 and r["samples_per_s"] > 0 and 0 <= r["padding_fraction"] < 1
    assert results["toolkit"]["micro_batch_size"] == 8 and results["toolkit"]["grad_accum_steps"] == 2
    assert "tiny-gemma2  toolkit" in proc.stdout and "x ref" in proc.stdout
