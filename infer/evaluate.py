"""Score a probability file against labels (``python -m infer evaluate``).

Prints a metrics table (exact match, micro/macro/weighted F1) for plain 0.5 thresholding, the default cascade and
the tuned thresholds (``--thresholds``), and writes beside it (``--out-dir``, default the probability file's folder):

* ``<stem>.eval.json``: the table, per-class F1, the threshold curve and the two breakdowns below;
* ``<stem>.per_class_f1.png``: per-class F1 bars (default cascade, and tuned when given);
* ``<stem>.threshold_curve.png``: exact match and micro-F1 of plain thresholds 0.05 .. 0.95, with the cascade's
  (and the tuned decoding's) scores as horizontal lines;
* ``<stem>.reliability.png``: the reliability (calibration) diagram over every (row, label) pair: the fraction of
  positives against the mean probability in 10 equal-width bins, the pairs per bin below; its expected calibration
  error (ECE) and Brier score are printed and in the JSON (``calibration``).

After the table, for the default cascade (and the tuned decoding), two breakdowns (:mod:`core.metrics`; in the JSON
as ``by_label_count`` and ``rare_class_f1``, per decoding):

* per true label count (0, 1, 2, 3, 4 or more; empty groups left out): the rows, their share, their exact match, the
  mean number of labels predicted for them and the share of them predicted with as many labels as they have
  (:func:`core.metrics.by_label_count`): whether the misses are the multi-label rows;
* rare vs frequent classes: a class is rare when at least one and at most ``--rare-max-prevalence`` (default 0.01)
  of the rows have it; per group the classes, their positives, their mean F1 and how many have F1 < 0.3 and F1 = 0
  (:func:`core.metrics.rare_class_f1`; classes without a positive are in neither group).

``--baseline OTHER.csv`` (another model's probabilities for the same rows, e.g. another run's ``oof.csv``) adds the
paired difference in exact match, this file minus the baseline, with a 95% bootstrap interval over the rows, for 0.5
thresholding and the default cascade: whether one model beats the other or the gap is noise.

Usage:
    python -m infer evaluate --probs oof.csv --labels train.csv [--thresholds thresholds.json] [--out-dir DIR]
                             [--baseline other_oof.csv] [--rare-max-prevalence 0.01]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.io import align_ids, atomic_path, optimistic_reason, read_labels, read_probs, write_json
from core.metrics import (
    by_label_count,
    exact_match,
    micro_f1,
    paired_difference,
    per_class_f1,
    rare_class_f1,
    scores,
)
from core.sets import SetDecoder, is_sets
from core.thresholds import ThresholdSpec, fallback_name, threshold

METRICS = ("exact_match", "micro_f1", "macro_f1", "weighted_f1")
CURVE = tuple(round(0.05 * k, 2) for k in range(1, 20))

logger = logging.getLogger(__name__)


def evaluate_arrays(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                    default: ThresholdSpec, tuned: ThresholdSpec | SetDecoder | None = None,
                    rare_max_prevalence: float = 0.01) -> dict:
    """Metrics of the decodings, per-class F1, the plain-threshold curve and, for the default cascade and the tuned
    decoding, the breakdowns by true label count and over rare / frequent classes (pure)."""
    decodings = {"threshold 0.5": threshold(probs, 0.5), "default cascade": default.decode(probs)}
    if tuned is not None:
        decodings["tuned"] = tuned.decode(probs)
    metrics = {k: scores(labels, v) for k, v in decodings.items()}
    per_class = {k: dict(zip(label_names, map(float, per_class_f1(labels, v)))) for k, v in decodings.items()
                 if k != "threshold 0.5"}
    counts, rare = {}, {}
    for k in per_class:
        counts[k] = by_label_count(labels, decodings[k])
        rare[k] = rare_class_f1(labels, decodings[k], rare_max_prevalence)
        rare[k]["rare"]["names"] = [label_names[j] for j in rare[k]["rare"]["indices"]]
    curve = {"threshold": list(CURVE),
             "exact_match": [exact_match(labels, threshold(probs, t)) for t in CURVE],
             "micro_f1": [micro_f1(labels, threshold(probs, t)) for t in CURVE]}
    positives = dict(zip(label_names, map(int, np.asarray(labels).sum(axis=0))))
    return {"rows": len(labels), "metrics": metrics, "per_class_f1": per_class, "positives": positives,
            "curve": curve, "calibration": calibration(probs, labels), "by_label_count": counts,
            "rare_class_f1": rare}


def calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability of the probabilities over every (row, label) pair (pure): per non-empty bin of equal width, the
    mean probability and the fraction of positives (:func:`sklearn.calibration.calibration_curve`) and the pairs in
    it; the expected calibration error (the bins' ``|fraction positive - mean probability|`` weighted by their pairs)
    and the Brier score (:func:`sklearn.metrics.brier_score_loss`)."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    y = np.asarray(labels).astype(int).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), 0.0, 1.0)
    fraction, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    pairs = np.bincount(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p), minlength=n_bins)  # sklearn's bins
    pairs = pairs[pairs > 0]
    return {"bins": n_bins, "mean_probability": mean.tolist(), "fraction_positive": fraction.tolist(),
            "pairs": pairs.tolist(), "ece": float(np.sum(pairs / len(p) * np.abs(fraction - mean))),
            "brier": float(brier_score_loss(y, p, pos_label=1))}


def compare(probs: np.ndarray, baseline: np.ndarray, labels: np.ndarray, default: ThresholdSpec) -> dict:
    """Paired exact-match difference, ``probs`` minus ``baseline`` (same rows), for 0.5 and the default cascade."""
    return {name: paired_difference(labels, decode(baseline), decode(probs))
            for name, decode in (("threshold 0.5", threshold), ("default cascade", default.decode))}


def compare_lines(comparison: dict, baseline: str | Path) -> list[str]:
    lines = [f"vs baseline {baseline} (exact match, this file minus the baseline, same rows):"]
    for name, c in comparison.items():
        lines.append(f"  {name:<16} {c['exact_match_b']:.4f} vs {c['exact_match_a']:.4f}: {c['difference']:+.4f} "
                     f"({c['confidence']:.0%} CI {c['low']:+.4f} .. {c['high']:+.4f}, paired bootstrap over "
                     f"{c['rows']} rows); right only here: {c['only_b']} rows, only in the baseline: {c['only_a']}")
    return lines


def table(metrics: dict) -> str:
    lines = [f"{'decoding':<18}" + "".join(f"{m:>13}" for m in METRICS)]
    for name, m in metrics.items():
        lines.append(f"{name:<18}" + "".join(f"{m[k]:>13.4f}" for k in METRICS))
    return "\n".join(lines)


def breakdown_lines(result: dict) -> list[str]:
    """The breakdowns of :func:`evaluate_arrays` as two small tables, the decodings side by side: one line per true
    label count, then one line each for the rare and the frequent classes."""
    counts, rare = result["by_label_count"], result["rare_class_f1"]
    kinds = list(counts)
    first = rare[kinds[0]]  # which classes are rare depends on the labels only: the same for every decoding

    def cell(v) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # names and counts as they are

    def row(head: str, cells: list[list]) -> str:
        return f"{head:<22}" + "".join("  |" + "".join(f"{cell(c):>13}" for c in cs) for cs in cells)

    def title_row() -> str:
        return f"{'':<22}" + "".join(f"  |{k:>39}" for k in kinds)

    cols = ("exact_match", "mean_predicted", "count_right")
    lines = ["rows by true label count (count_right: the share predicted with as many labels as they truly have):",
             title_row(), row(f"{'labels':<8}{'rows':>7}{'share':>7}",
                              [("exact_match", "mean_pred", "count_right")] * len(kinds))]
    for i, g in enumerate(counts[kinds[0]]):
        lines.append(row(f"{g['labels']:<8}{g['rows']:>7}{g['share']:>7.1%}",
                         [[counts[k][i][c] for c in cols] for k in kinds]))
    lines += [f"classes by positives (rare: at least 1 and at most {first['max_prevalence']:g} of the "
              + f"{first['rows']} rows; {first['absent']} classes without a positive left out):", title_row(),
              row(f"{'classes':<9}{'n':>3}{'positives':>10}",
                  [("mean_f1", f"f1 < {first['low_f1']:g}", "f1 = 0")] * len(kinds))]
    for group in ("rare", "frequent"):
        g = first[group]
        span = f"{g['min_positives']}..{g['max_positives']}" if g["classes"] else "-"
        lines.append(row(f"{group:<9}{g['classes']:>3}{span:>10}",
                         [[rare[k][group][c] for c in ("mean_f1", "below_low_f1", "zero_f1")] for k in kinds]))
    return lines


def class_labels(names: Sequence[str], positives: dict, descriptions: dict | None = None, width: int = 40) -> list[str]:
    """Tick labels of the per-class chart: column name, its human-readable name when known (shortened), count."""
    out = []
    for n in names:
        d = " ".join(str((descriptions or {}).get(n) or "").split())
        d = d if len(d) <= width else d[:width - 1] + "…"
        out.append(f"{n} {d} (n={positives[n]})" if d else f"{n} (n={positives[n]})")
    return out


def run_descriptions(probs: Path, names: Sequence[str]) -> dict:
    """Human-readable class names from the run folder's ``label_names.json`` beside ``probs`` (none if absent)."""
    path = probs.parent / "label_names.json"
    try:
        descriptions = json.loads(path.read_text()).get("descriptions") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {n: descriptions[n] for n in names if n in descriptions}


def plot_per_class(result: dict, path: Path, title: str, descriptions: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_class, pos = result["per_class_f1"], result["positives"]
    names = list(pos)
    kinds = list(per_class)
    fig, ax = plt.subplots(figsize=(12 if descriptions else 9, max(4.0, 0.22 * len(names) * max(1, len(kinds)) ** 0.5 + 1.5)))
    y = np.arange(len(names))
    h = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.barh(y + (i - (len(kinds) - 1) / 2) * h, [per_class[kind][n] for n in names], height=h, label=kind)
    ax.set_yticks(y, class_labels(names, pos, descriptions), fontsize=7 if len(names) > 30 else 9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a bar
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_curve(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["curve"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    colors = {"exact_match": "tab:blue", "micro_f1": "tab:orange"}
    for m in ("exact_match", "micro_f1"):
        ax.plot(c["threshold"], c[m], marker="o", ms=3, color=colors[m], label=f"{m} (plain threshold)")
        for kind, style in (("default cascade", "--"), ("tuned", ":")):
            if kind in result["metrics"]:
                v = result["metrics"][kind][m]
                ax.axhline(v, color=colors[m], ls=style, lw=1.2, label=f"{m}, {kind}: {v:.3f}")
    ax.set_xlabel("global threshold (probability > t)")
    ax.set_ylabel("score")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_reliability(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["calibration"]
    fig, (ax, bars) = plt.subplots(2, 1, figsize=(6.4, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfectly calibrated")
    ax.plot(c["mean_probability"], c["fraction_positive"], marker="o", color="tab:blue",
            label=f"this file: ECE {c['ece']:.4f}, Brier {c['brier']:.4f}")
    ax.set(ylabel="fraction of positives", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    width = 1 / c["bins"]  # each bar over its bin (the bin that holds its mean probability)
    centers = (np.minimum(np.floor(np.asarray(c["mean_probability"]) * c["bins"]), c["bins"] - 1) + 0.5) * width
    bars.bar(centers, c["pairs"], width=width * 0.9, color="tab:blue", alpha=0.6)
    bars.set(yscale="log", xlabel=f"mean predicted probability ({c['bins']} bins)", ylabel="(row, label) pairs")
    bars.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def evaluate(probs: str | Path, labels: str | Path, thresholds: str | Path | None = None,
             out_dir: str | Path | None = None, fallback=None, baseline: str | Path | None = None,
             id_column: str | None = None, rare_max_prevalence: float = 0.01) -> dict:
    """Read and validate, score, print the table, then write the JSON and the two PNGs."""
    from core.decoding import labels_id_column
    from infer.submit import load_decoding

    ids, p, names = read_probs(probs)
    label_ids, y_all = read_labels(labels, names, probs_path=probs, id_column=labels_id_column(probs, id_column))
    y = y_all[align_ids(probs, ids, labels, label_ids)]
    tuned = load_decoding(probs, names, thresholds, None) if thresholds is not None else None
    if tuned is not None and list(tuned.label_names) != list(names):  # same set, other order: follow the thresholds
        pos = {n: j for j, n in enumerate(names)}
        order = [pos[n] for n in tuned.label_names]
        p, y, names = p[:, order], y[:, order], list(tuned.label_names)
    if fallback is None and tuned is not None:  # the default cascade falls back like the tuned decoding
        fallback = fallback_name(names, tuned.fallback)
    default = load_decoding(probs, names, None, fallback)
    if baseline is not None:  # every row of --probs must be in the baseline; its columns follow --probs
        base_ids, base_p, _ = read_probs(baseline, names)
        comparison = compare(p, base_p[align_ids(probs, ids, baseline, base_ids)], y, default)
    result = evaluate_arrays(p, y, names, default, tuned, rare_max_prevalence)
    if baseline is not None:
        result["baseline"] = {"probs": str(baseline), **comparison}
    probs = Path(probs)
    out_dir = probs.parent if out_dir is None else Path(out_dir)
    stem = probs.stem
    files = {"json": out_dir / f"{stem}.eval.json", "per_class_png": out_dir / f"{stem}.per_class_f1.png",
             "curve_png": out_dir / f"{stem}.threshold_curve.png",
             "reliability_png": out_dir / f"{stem}.reliability.png"}
    note = "" if len(ids) == len(label_ids) else f" ({len(ids)} of the {len(label_ids)} labelled rows)"
    logger.info(f"evaluate: {len(ids)} rows x {len(names)} classes of {probs} against {labels}{note}")
    logger.info(table(result["metrics"]))
    logger.info("\n".join(breakdown_lines(result)))
    cal = result["calibration"]
    logger.info(f"calibration over {len(ids) * len(names)} (row, label) pairs: ECE {cal['ece']:.4f}, "
                f"Brier {cal['brier']:.4f} ({cal['bins']} bins)")
    if baseline is not None:
        logger.info("\n".join(compare_lines(comparison, baseline)))
    reason = optimistic_reason(probs)
    if reason:
        logger.info(f"note: {probs}: {reason}")
        result["optimistic"] = reason
    tuned_on = tuned.meta.get("oof") if tuned is not None else None
    if tuned_on and Path(tuned_on).resolve() == Path(probs).resolve():
        kind = "sets" if is_sets(tuned) else "tuned"  # the nested estimate of the decoding the file holds
        nested = (tuned.meta.get("nested") or {}).get("pooled", {}).get(kind, {})
        logger.info(f"note: {thresholds} was tuned on this file, so its row is in-sample (optimistic)"
                    + (f"; its nested estimate: exact_match {nested['exact_match']:.4f}, "
                       f"micro_f1 {nested['micro_f1']:.4f}" if "exact_match" in nested else ""))
    title = f"{probs.name}: {len(ids)} rows"
    plot_per_class(result, files["per_class_png"], f"per-class F1, {title}", run_descriptions(probs, names))
    plot_curve(result, files["curve_png"], f"score vs global threshold, {title}")
    plot_reliability(result, files["reliability_png"], f"reliability, {title}")
    write_json(files["json"], {"probs": str(probs), "labels": str(labels),
                               "thresholds": None if thresholds is None else str(thresholds), **result,
                               "files": {k: str(v) for k, v in files.items() if k != "json"}})
    logger.info("wrote " + ", ".join(str(v) for v in files.values()))
    result["files"] = files
    return result

