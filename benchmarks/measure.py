"""What a benchmark reads off a run: throughput over the timed steps, MFU, peak GPU memory and peak RSS."""

from __future__ import annotations

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "A10G": 125.0}


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def non_embedding_params(model) -> int:
    n = 0
    for name, p in model.named_parameters():
        if "embed" in name or "score" in name or "lora_" in name:
            continue
        n += p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
    return n


def summarise(step_log: list, warmup: int, n_params: int) -> dict:
    """Throughput over the optimizer steps after ``warmup`` (step_log: (end time, rows, real, padded) per step)."""
    steps = step_log[warmup:]
    if len(steps) < 2:
        raise RuntimeError(f"need more than {warmup + 1} steps to measure, got {len(step_log)}")
    seconds = steps[-1][0] - steps[0][0]
    rows = sum(s[1] for s in steps[1:])
    real = sum(s[2] for s in steps[1:])
    padded = sum(s[3] for s in steps[1:])
    out = {"steps_timed": len(steps) - 1, "seconds": round(seconds, 3), "samples_per_s": rows / seconds,
           "real_tokens_per_s": real / seconds, "padding_fraction": 1 - real / padded,
           "s_per_step": seconds / (len(steps) - 1), "non_embedding_params": n_params}
    peak = peak_tflops()
    out["mfu"] = 4 * n_params * out["real_tokens_per_s"] / (peak * 1e12) if peak else None
    return out


def rss_peak_gib() -> float:
    """Peak resident memory of this process (the memory figure on a CPU; on Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gpu_peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
