"""`bash benchmarks/gpu.sh OUT --smoke`: the one-call GPU benchmark rehearsed on the CPU with tiny shapes, so that a
session lent a GPU (rare, 15 minutes) can run it unchanged. Figures are not asserted, only that each planned step
measured one (or was skipped for its stated reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import ROOT

from benchmarks import gpu_report

PLANNED = [("9b", r) for r in ("reference", "toolkit", "toolkit-t4", "trainer-toolkit")] + [
    ("9b-t4-mb16-tok1024", "toolkit-t4"), ("predict-9b", "predict"), ("27b-split", "split-0"),
    ("27b-split", "split-1"), ("270m", "toolkit"), ("270m", "trainer-toolkit")]
"""Each step's measurements in --smoke (the 270M's step runs the two recipes that read its config there; on a GPU
also reference and toolkit-t4, the same code as the 9B's)."""


def read_lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_gpu_script_smoke_measures_every_planned_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", str(out), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = read_lines(out / "results.jsonl")
    figures = {(r["step"], r["recipe"]): r for r in lines if "recipe" in r}
    for key in PLANNED:
        assert key in figures, (key, sorted(figures))
        assert "error" not in figures[key], figures[key]
    for key, r in figures.items():
        speed = r["batched"]["rows_per_s"] if r["recipe"] == "predict" else r["samples_per_s"]
        assert speed > 0, key
    status = {r["step"]: r["status"] for r in lines if "status" in r}
    assert status.pop("9b-t4-mb16-tok768") == "skipped"  # only run when 1024 tokens run out of memory
    assert set(status.values()) == {"done"}, status
    assert {"install", "tokens", "9b", "9b-t4-mb16-tok1024", "predict-9b", "270m", "27b-split"} <= set(status)

    budget = figures[("9b-t4-mb16-tok1024", "toolkit-t4")]
    assert budget["micro_batch_size"] == 16 and budget["max_tokens_per_micro_batch"] == 1024
    assert budget["dtype"] == "torch.float16"  # the T4 profile
    trainer = figures[("9b", "trainer-toolkit")]
    assert trainer["micro_batch_size"] == figures[("9b", "toolkit")]["micro_batch_size"] == 8
    assert trainer["grad_checkpointing"] is False and trainer["optimizer"] == "AdamW8bit"  # the 9B config's
    assert figures[("270m", "toolkit")]["model"] == "tiny-gemma3"  # the 270M's architecture and config
    assert [figures[("27b-split", f"split-{d}")]["layers"] for d in (0, 1)] == [[0, 2], [2, 4]]
    assert figures[("predict-9b", "predict")]["max_abs_diff"] < 1e-3

    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed at the end too
    for step, recipe in PLANNED:
        assert f"| {step} | " in summary and f" | {recipe} | " in summary
    assert "| 27b-split | tiny-gemma2 | split, 2 devices |" in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu.log", "results.jsonl", "summary.md"]  # <= 8 come back


@pytest.mark.slow
def test_gpu_script_skips_the_steps_its_budget_cannot_fit(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", str(out), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_SH_BUDGET_S": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = read_lines(out / "results.jsonl")
    assert not [r for r in lines if "recipe" in r]
    skipped = {r["step"]: r["reason"] for r in lines if r.get("status") == "skipped"}
    for step in ("tokens", "9b", "9b-t4-mb16-tok1024", "270m", "27b-split"):
        assert skipped[step].startswith("not started: ") and "of the 1s budget" in skipped[step]
    assert skipped["predict-9b"].startswith("no tiny-gemma2 shape was built")
    assert skipped["9b-t4-mb16-tok768"] == "micro-batch 16 at 1024 tokens has no figure nor out-of-memory error"
    assert "| 27b-split | skipped | not started" in (out / "summary.md").read_text()


def test_report_oom_check_and_summary_of_a_split_and_an_error():
    lines = [
        {"step": "env", "device": "NVIDIA H200", "device_gib": 139.8, "torch": "2.11"},
        {"step": "a", "model": "m", "recipe": "reference", "samples_per_s": 2.0, "real_tokens_per_s": 80.0,
         "padding_fraction": 0.3, "peak_gib": 9.5, "mfu": 0.01, "steps_timed": 10},
        {"step": "b", "model": "m", "recipe": "toolkit-t4", "error": "torch.OutOfMemoryError: CUDA out of memory."},
        {"step": "c", "model": "m", "recipe": "split-0", "samples_per_s": 8.0, "real_tokens_per_s": 300.0,
         "padding_fraction": 0.05, "peak_gib": 12.0, "mfu": 0.1, "steps_timed": 6, "micro_batch_size": 4,
         "grad_accum_steps": 4, "s_per_step": 1.0, "layers": [0, 24], "split_parts": 2},
        {"step": "c", "model": "m", "recipe": "split-1", "samples_per_s": 8.0, "real_tokens_per_s": 300.0,
         "padding_fraction": 0.05, "peak_gib": 13.0, "mfu": 0.1, "steps_timed": 6, "micro_batch_size": 4,
         "grad_accum_steps": 4, "s_per_step": 3.0, "layers": [24, 46], "split_parts": 2},
        {"step": "d", "status": "timeout", "reason": "stopped after 100s"},
    ]
    assert gpu_report.ran_out_of_memory(lines, "b") and not gpu_report.ran_out_of_memory(lines, "a")
    assert gpu_report.measured(lines, "a") and not gpu_report.measured(lines, "b")
    text = gpu_report.summary(lines)
    assert "device: NVIDIA H200 (140 GiB)" in text
    assert "| b | m | toolkit-t4 | - | - | - | - | - | - | ERROR: torch.OutOfMemoryError" in text
    # 16 rows per step over 1 s + 3 s; 4 samples/s = 2x the reference; the higher peak is the split's
    assert "| c | m | split, 2 devices | 4.00 | - | - | 13.00 | - | 2.00 | per device: GPU 0 12.00 GiB, GPU 1" in text
    assert "| d | timeout | stopped after 100s |" in text


def test_gemma3_270m_shape_is_the_embedded_models_text_config():
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.shapes import shape_config

    config = shape_config("gemma-3-270m")
    want = {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 2048, "vocab_size": 262144,
            "sliding_window": 512, "query_pre_attn_scalar": 256,
            "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    have = config.to_dict()
    assert {k: have.get(k) for k in want} == want
    cached = sorted((Path.home() / ".cache" / "qlora-multilabel").glob("gemma-3-270m*-hf/config.json"))
    if cached:  # the embedded model converted from the GGUF: every architecture key agrees
        real = json.loads(cached[0].read_text())
        skip = {"_model_name_or_path", "architectures", "dtype", "transformers_version", "unk_token_id"}
        diff = {k: (v, have.get(k)) for k, v in real.items() if k not in skip and have.get(k) != v
                and not (isinstance(v, float) and abs(v - have.get(k)) < 1e-9)}
        assert not diff
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 268  # Gemma 3 270M (tied embedding)
