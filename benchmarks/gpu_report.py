"""The bookkeeping of ``benchmarks/gpu.sh``: the environment line, step marks, the out-of-memory check, the summary.

Every line of the results file (JSON lines) has a ``step``: a measurement (``recipe`` + figures, or ``error``), a
step's status (``status``: done / skipped / timeout / error, with a ``reason``), or the environment (``env``).
Nothing here imports torch except ``env``, so a mark costs a fraction of a second.

    python -m benchmarks.gpu_report env RESULTS
    python -m benchmarks.gpu_report mark RESULTS STEP STATUS REASON
    python -m benchmarks.gpu_report oom RESULTS STEP        # exit 0: STEP ran out of memory; 1: measured; 2: neither
    python -m benchmarks.gpu_report summary RESULTS OUT.md  # the table, printed and written
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


def append(path: str, line: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def read(path: str) -> list[dict]:
    if not Path(path).is_file():
        return []
    out = []
    for raw in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:  # a line cut short by a kill
            continue
    return out


def env_line() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    import torch

    line = {"step": "env", "python": platform.python_version(), **versions, "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "disk_free_gib": round(shutil.disk_usage("/tmp").free / 2**30, 1)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        line.update(device=props.name, device_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    else:
        line["device"] = "cpu"
    try:
        import bitsandbytes  # noqa: F401

        line["bitsandbytes_import"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, the steps will fail with it
        line["bitsandbytes_import"] = f"{type(e).__name__}: {e}"
    return line


def ran_out_of_memory(lines: list[dict], step: str) -> bool:
    return any(r.get("step") == step and "error" in r and "out of memory" in r["error"].lower() for r in lines)


def measured(lines: list[dict], step: str) -> bool:
    return any(r.get("step") == step and "recipe" in r and "error" not in r for r in lines)


def _f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def summary(lines: list[dict]) -> str:
    """The markdown table: one row per measurement, a combined row per split, one per predict, then step statuses."""
    env = next((r for r in lines if r.get("step") == "env"), {})
    figures = [r for r in lines if "recipe" in r]
    refs = {}
    for r in figures:
        if r["recipe"] == "reference" and "error" not in r:
            refs.setdefault(r["model"], r)
    device = (f"device: {env.get('device', '?')} ({_f(env.get('device_gib'), '.0f')} GiB), torch {env.get('torch')}, "
              f"transformers {env.get('transformers')}, peft {env.get('peft')}, "
              f"bitsandbytes {env.get('bitsandbytes')}; {env.get('date', '')}")
    out = [device, "",
           "| step | model | recipe | samples/s | tokens/s | pad | peak GiB | MFU | x ref | settings / note |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in figures:
        head = f"| {r.get('step')} | {r.get('model')} | {r['recipe']} |"
        if "error" in r:
            out.append(f"{head} - | - | - | - | - | - | ERROR: {r['error'][:160]} |")
            continue
        if r["recipe"] == "predict":
            b, o = r["batched"], r["one_at_a_time"]
            out.append(f"{head} {b['rows_per_s']:.1f} | - | - | - | - | x{r['speedup']:.2f} | batched (batch "
                       f"{r['batch_size']}) vs one row at a time {o['rows_per_s']:.1f} rows/s; {r['rows']} rows, "
                       f"{r['dtype']}, max abs diff {r['max_abs_diff']:.1e} |")
            continue
        ref = refs.get(r["model"])
        part = r["recipe"].startswith("split-")
        ratio = r["samples_per_s"] / ref["samples_per_s"] if ref and not part else None
        note = []
        if "micro_batch_size" in r:
            note.append(f"mb {r['micro_batch_size']} x {r['grad_accum_steps']}")
        if r.get("max_tokens_per_micro_batch"):
            note.append(f"<= {r['max_tokens_per_micro_batch']} tokens/piece")
        if r.get("grad_checkpointing"):
            note.append("grad ckpt")
        if r.get("dtype"):
            note.append(r["dtype"].removeprefix("torch."))
        if part:
            note.append(f"layers {r['layers'][0]}-{r['layers'][1] - 1}")
        note.append(f"{r.get('steps_timed')} steps timed")
        out.append(f"{head} {r['samples_per_s']:.2f} | {r['real_tokens_per_s']:.0f} | {r['padding_fraction']:.2f} | "
                   f"{_f(r.get('peak_gib'))} | {_f(r.get('mfu'), '.2%')} | {_f(ratio)} | {', '.join(note)} |")
    for step in dict.fromkeys(r.get("step") for r in figures if r["recipe"].startswith("split-")):
        parts = [r for r in figures if r.get("step") == step and r["recipe"].startswith("split-")]
        if any("error" in r for r in parts) or len(parts) != parts[0].get("split_parts", len(parts)):
            continue
        rows = parts[0]["micro_batch_size"] * parts[0]["grad_accum_steps"]
        speed = rows / sum(r["s_per_step"] for r in parts)
        ref = refs.get(parts[0]["model"])
        peaks = ", ".join(f"GPU {i} {_f(r.get('peak_gib'))} GiB" for i, r in enumerate(parts))
        top = max((r["peak_gib"] for r in parts if r.get("peak_gib") is not None), default=None)
        out.append(f"| {step} | {parts[0]['model']} | split, {len(parts)} devices | {speed:.2f} | - | - | "
                   f"{_f(top)} | - | "
                   f"{_f(speed / ref['samples_per_s'] if ref else None)} | per device: {peaks}; devices run one "
                   f"after the other |")
    out += ["", "| step | status | note |", "|---|---|---|"]
    for r in lines:
        if "status" in r:
            out.append(f"| {r['step']} | {r['status']} | {r.get('reason', '')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "env":
        line = env_line()
        append(rest[0], line)
        print(json.dumps(line))
    elif cmd == "mark":
        path, step, status, reason = rest
        append(path, {"step": step, "status": status, "reason": reason, "time": time.strftime("%H:%M:%S")})
    elif cmd == "oom":
        lines = read(rest[0])
        return 0 if ran_out_of_memory(lines, rest[1]) else 1 if measured(lines, rest[1]) else 2
    elif cmd == "summary":
        text = summary(read(rest[0]))
        Path(rest[1]).write_text(text)
        print(text)
    else:
        print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
