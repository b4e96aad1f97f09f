"""CPU compute dtypes side by side on the real Gemma 3 270M and DLS rows: training samples/s, predict rows/s, peak
RSS, achieved GFLOP/s against this CPU's measured GEMM peak, and the dtype each part of a step runs in.

Usage (nothing else running; each mode and repeat in its own process, so peak RSS is clean):
    python -m benchmarks.cpu_dtype                                   # 3 modes x 2 repeats
    ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.cpu_dtype --modes ""  # a CPU without native bf16: GEMM probe
    ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.cpu_dtype --modes fp32-4bit --repeats 1      # and fp32 there

Modes:
  fp32-4bit   4-bit NF4 weights, fp32 compute (``model.dtype: float32``; ``auto`` on CPUs without native bf16)
  bf16-4bit   4-bit NF4 weights, bf16 compute under autocast (``model.dtype: bfloat16``)
  bf16-plain  plain bf16 weights, no 4-bit (``quantization.load_in_4bit: false``): what 4-bit costs on a CPU

Training runs the toolkit's loop (``benchmarks.runner``'s toolkit recipe: the shipped config, micro-batch 16,
length-grouped) for ``--warmup`` + ``--steps`` optimizer steps; predict is ``core.model.predict_probs`` at the
config's eval batch size over the first ``--predict-rows`` rows with the LoRA adapters attached. GFLOP/s counts
4 x non-embedding parameters per real training token (forward 2N + backward through activations 2N, as the runner's
MFU) and 2N per predicted token; the GEMM peak is the best of a few matmuls of the 270M's shapes in each dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks.shapes import DLS, log

MODES = {
    "fp32-4bit": ["model.dtype=float32"],
    "bf16-4bit": ["model.dtype=bfloat16"],
    "bf16-plain": ["model.dtype=bfloat16", "quantization.load_in_4bit=false"],
}
GEMM_SHAPES = ((1024, 640, 2048), (1024, 2048, 640), (2048, 2048, 2048))
"""(rows, in, out) of the 270M's MLP matmuls at ~1k tokens, and a square one."""


def gemm_peak(dtype, seconds: float = 2.0) -> float:
    """Best GFLOP/s of a few matmuls in ``dtype`` (each timed for about ``seconds``)."""
    import torch

    best = 0.0
    for n, k, m in GEMM_SHAPES:
        a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n * k * m * reps / (time.perf_counter() - t0) / 1e9)
    return best


def step_dtypes(model, ids, dtype) -> dict:
    """The dtype each part of one training forward/backward runs in (hooks on the first LoRA layer, the head, the
    loss): where autocast does not reach (bitsandbytes' CPU 4-bit matmul, the fp32 head, the loss)."""
    import torch

    from core.data import collate
    from core.model import autocast, input_device

    seen: dict[str, str] = {}
    lora_layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer"))
    head = next(m for n, m in model.named_modules() if n.endswith("score.modules_to_save.default")
                or (n.endswith("score") and isinstance(m, torch.nn.Linear)))

    def hook(name):
        def record(module, inputs, out):
            seen[f"{name} in"] = str(inputs[0].dtype).removeprefix("torch.")
            seen[f"{name} out"] = str(out.dtype).removeprefix("torch.")
        return record

    handles = [lora_layer.base_layer.register_forward_hook(hook(f"base {type(lora_layer.base_layer).__name__}")),
               lora_layer.lora_A["default"].register_forward_hook(hook("lora_A")),
               head.register_forward_hook(hook("score head"))]
    device = input_device(model)
    batch = collate(ids[:4], model.config.pad_token_id)
    with autocast(device, dtype):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.zeros_like(logits.float()))
    loss.backward()
    for h in handles:
        h.remove()
    seen["loss"] = str(loss.dtype).removeprefix("torch.")
    seen["lora_A grad"] = str(lora_layer.lora_A["default"].weight.grad.dtype).removeprefix("torch.")
    model.zero_grad(set_to_none=True)
    return seen


def worker(args) -> None:
    import torch
    from transformers import AutoConfig

    from benchmarks.measure import non_embedding_params, rss_peak_gib
    from benchmarks.runner import run_toolkit
    from benchmarks.shapes import CONFIGS, dls_tokens, embedded_path
    from core.config import RunConfig
    from core.model import load_classifier, pick_dtype, predict_probs
    from train.lora import apply_lora

    torch.manual_seed(0)
    path = embedded_path(None)
    ids, labels = dls_tokens(args.data, None, AutoConfig.from_pretrained(path).vocab_size)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ids))
    ids, labels = [ids[i] for i in perm], labels[perm]
    overrides = MODES[args.worker]
    train = run_toolkit(path, "embedded", ids, labels, args.steps, args.warmup, False, overrides=overrides)

    cfg = RunConfig.from_yaml(CONFIGS["embedded"], [f"model.name_or_path={path}", *overrides])
    device = torch.device("cpu")
    model, tok, dtype = load_classifier(path, labels.shape[1], cfg.model, cfg.quantization, device, seed=42)
    n_params = non_embedding_params(model)
    model = apply_lora(model, cfg.lora, False)
    dtypes = step_dtypes(model, ids, dtype)
    rows = ids[:args.predict_rows]
    predict_probs(model, rows[:cfg.train.eval_batch_size], tok.pad_token_id, cfg.train.eval_batch_size, dtype,
                  progress=False)  # warm-up batch
    t0 = time.perf_counter()
    predict_probs(model, rows, tok.pad_token_id, cfg.train.eval_batch_size, dtype, progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r) for r in rows)
    auto = pick_dtype(type(cfg.model)(dtype="auto"), device)
    out = {"mode": args.worker, "dtype": str(dtype).removeprefix("torch."),
           "auto_dtype": str(auto).removeprefix("torch."), "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"),
           "train_samples_per_s": train["samples_per_s"], "train_real_tokens_per_s": train["real_tokens_per_s"],
           "train_steps_timed": train["steps_timed"],
           "train_gflops": 4 * n_params * train["real_tokens_per_s"] / 1e9,
           "predict_rows_per_s": len(rows) / seconds, "predict_gflops": 2 * n_params * tokens / seconds / 1e9,
           "predict_rows": len(rows), "rss_peak_gib": rss_peak_gib(), "non_embedding_params": n_params,
           "step_dtypes": dtypes, "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(args, mode: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.cpu_dtype", "--worker", mode, "--data", args.data,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--predict-rows", str(args.predict_rows)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
    line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if line is None:
        res = {"mode": mode, "error": " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit {proc.returncode}"}
    else:
        res = json.loads(line.removeprefix("RESULT "))
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_dtype", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps (micro-batch 16) per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--predict-rows", type=int, default=256)
    p.add_argument("--data", default=DLS)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--jsonl", help="append every measurement to this file as it is made")
    p.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    from core.config import ModelArgs
    from core.model import pick_dtype

    peaks = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    auto = str(pick_dtype(ModelArgs(dtype="auto"), torch.device("cpu"))).removeprefix("torch.")
    log(f"GEMM peak ({torch.get_num_threads()} threads, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()) + f"; model.dtype auto -> {auto}")
    if not modes:  # --modes "": the probe alone (e.g. under an ISA cap, where emulated bf16 steps take many minutes)
        return 0
    results = []
    for rep in range(args.repeats):
        for mode in modes:
            log(f"== {mode}, repeat {rep + 1}/{args.repeats}")
            res = run_worker(args, mode) | {"repeat": rep + 1, "gemm_peak_gflops": peaks}
            log(json.dumps(res))
            results.append(res)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(res) + "\n")
    print(table(results, peaks))
    return 0


def table(results: list[dict], peaks: dict) -> str:
    """Markdown table: each mode's median over repeats (and the spread), GFLOP/s as a share of its dtype's peak."""
    lines = [("| mode | train samples/s | predict rows/s | peak RSS GiB | train GFLOP/s (% of GEMM peak) | "
              "predict GFLOP/s (% of peak) | repeats |"), "|---|---|---|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in results):
        ok = [r for r in results if r["mode"] == mode and "error" not in r]
        if not ok:
            err = next(r["error"] for r in results if r["mode"] == mode)
            lines.append(f"| {mode} | failed: {err} | | | | | 0 |")
            continue
        peak = peaks[ok[0]["dtype"]]

        def cell(key, spec=".2f", ok=ok):
            vals = [r[key] for r in ok]
            spread = f" ({min(vals):{spec}}-{max(vals):{spec}})" if len(vals) > 1 else ""
            return f"{np.median(vals):{spec}}{spread}"

        tg, pg = np.median([r["train_gflops"] for r in ok]), np.median([r["predict_gflops"] for r in ok])
        lines.append(f"| {mode} | {cell('train_samples_per_s')} | {cell('predict_rows_per_s')} | "
                     f"{cell('rss_peak_gib')} | {tg:.1f} ({100 * tg / peak:.0f}%) | {pg:.1f} ({100 * pg / peak:.0f}%) "
                     f"| {len(ok)} |")
    dtypes = {r["mode"]: r["step_dtypes"] for r in results if "step_dtypes" in r}
    lines += ["", "dtypes inside one training step: " + json.dumps(dtypes)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
