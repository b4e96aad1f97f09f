"""Training curves as a picture, ``RUN/curves.png``: the training loss per optimizer step and the decoded exact match
and micro-F1 of the held-out rows per epoch, one line per fold (and the final model's loss, if any). Drawn from the
folds' ``metrics.json`` (``log_history``: per step; ``history``: per epoch), which the checkpoints carry across a
resume, so the curves of a resumed run are whole and do not depend on ``train.report_to``. DAPT draws its own loss
(:func:`plot_dapt`). matplotlib, Agg backend; written atomically."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from core.io import atomic_path

logger = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
EPOCH_METRICS = {"exact_match": "exact match", "micro_f1": "micro-F1"}


def _order(folder: Path) -> tuple:
    m = re.fullmatch(r"fold_(\d+)", folder.name)
    return (0, int(m.group(1)), "") if m else (1, 0, folder.name)


def run_curves(run_dir: str | Path) -> dict[str, dict]:
    """What ``curves.png`` draws: for each finished model of the run (``fold_K``, ``final`` ...: a folder with a
    ``metrics.json``), in fold order, ``{"log_history": [per step], "history": [per epoch]}``. A ``metrics.json``
    from before the per-step log was kept has its epochs only."""
    out = {}
    for folder in sorted((p.parent for p in Path(run_dir).glob("*/metrics.json")), key=_order):
        m = json.loads((folder / "metrics.json").read_text())
        out[folder.name.replace("_", " ")] = {"log_history": m.get("log_history") or [],
                                             "history": m.get("history") or []}
    return out


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start), to see the trend through the per-step noise."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(curves: dict[str, dict], path: Path, title: str) -> None:
    """Three panels: loss per step, then exact match and micro-F1 per epoch (the run's cascade, solid; set
    decoding, dashed, when the run used it), one colour per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, c) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        log = [r for r in c["log_history"] if r.get("loss") is not None]
        if log:
            steps, loss = [r["step"] for r in log], [r["loss"] for r in log]
            window = max(1, len(loss) // 20)
            axes[0].plot(steps, loss, color=color, alpha=0.25, lw=0.8)
            axes[0].plot(steps, smooth(loss, window), color=color, lw=1.6,
                         label=f"{name}" + (f" (mean of {window} steps)" if window > 1 else ""))
        for ax, metric in zip(axes[1:], EPOCH_METRICS):
            for decoding, style in (("cascade", "-"), ("sets", "--")):
                rows = [h for h in c["history"] if f"{decoding}/{metric}" in h]
                if rows:
                    ax.plot([h["epoch"] for h in rows], [h[f"{decoding}/{metric}"] for h in rows], style,
                            marker="o", color=color, label=f"{name}, {decoding}")
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="loss per step")
    for ax, shown in zip(axes[1:], EPOCH_METRICS.values()):
        ax.set(xlabel="epoch", ylabel=shown, title=f"held-out {shown} (decoded)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def write_run_curves(run_dir: str | Path) -> Path | None:
    """Draw ``run_dir/curves.png`` from the run's finished models (none yet: nothing written); returns its path."""
    run_dir = Path(run_dir)
    curves = run_curves(run_dir)
    if not curves:
        return None
    path = run_dir / CURVES_FILE
    steps = sum(len(c["log_history"]) for c in curves.values())
    plot_run(curves, path, f"{run_dir.resolve().name}: {', '.join(curves)} ({steps} optimizer steps)")
    logger.info(f"wrote {path}")
    return path


def plot_dapt(losses: list[float], path: Path, title: str, eval_start: float | None = None,
              eval_end: float | None = None) -> None:
    """DAPT's next-token loss per optimizer step (and the held-out rows' loss before and after, if measured)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.4))
    steps = np.arange(1, len(losses) + 1)
    window = max(1, len(losses) // 20)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, smooth(losses, window), color="tab:blue", lw=1.6,
            label="training loss" + (f" (mean of {window} steps)" if window > 1 else ""))
    if eval_start is not None and eval_end is not None:
        ax.plot([0, len(losses)], [eval_start, eval_end], "s--", color="tab:orange", label="held-out loss")
    ax.set(xlabel="optimizer step", ylabel="next-token loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
