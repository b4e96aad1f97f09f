"""The figures of ``bash benchmarks/students.sh RUNS``: teacher vs distilled pruned students, side by side.

Usage:
    python -m benchmarks.students runs/students [--labels ../shared/data/dls/train.csv] [--json out.json]

Per model: decoder layers and parameters of its base, adapter weight size, out-of-fold exact match (0.5 and the
run's default cascade) on the folds it trained, the paired difference to the teacher on the same rows (95% bootstrap
interval, ``infer evaluate --baseline``), the student's cascade exact match as a fraction of the teacher's, and CPU
``infer predict`` speed on the same rows (rows/s without model loading, load seconds, peak RSS of the process).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.vocab import safetensors_params
from core.adapter import finished_folds
from core.config import RunConfig
from core.io import meta_path


def base_folder(run: Path) -> Path:
    from core.model import resolve_model_path

    cfg = RunConfig.from_yaml(run / "run_config.yaml")
    return Path(resolve_model_path(cfg.model, log=lambda m: None))


def row(run: Path, labels: str, teacher: Path | None, times: dict) -> dict:
    from infer.evaluate import evaluate

    base = base_folder(run)
    layers = json.loads((base / "config.json").read_text()).get("num_hidden_layers")
    folds = finished_folds(run, "last")
    adapter = folds[0][1] / "last"
    res = evaluate(run / "oof.csv", labels, log=lambda m: None, out_dir=run,
                   baseline=None if teacher is None else teacher / "oof.csv")
    m = res["metrics"]
    out = {"run": str(run), "layers": layers, "base_params": safetensors_params(base),
           "adapter_mib": sum(f.stat().st_size for f in adapter.glob("*.safetensors")) / 2**20,
           "folds": [f for f, _ in folds], "rows": res["rows"],
           "em_0.5": m["threshold 0.5"]["exact_match"], "em_cascade": m["default cascade"]["exact_match"]}
    if teacher is not None:
        out["vs_teacher"] = {k: res["baseline"][k] for k in ("threshold 0.5", "default cascade")}
    pred = run.parent / f"predict_{run.name}.csv"
    if pred.is_file():
        meta = json.loads(meta_path(pred).read_text())
        out.update(rows_per_s=meta["rows_per_s"], load_s=meta["seconds"]["load"], predict_rows=meta["rows"])
    t = times.get(f"predict_{run.name}")
    if t:
        out["peak_rss_gib"] = t["peak_rss_kib"] / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.students", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the folder benchmarks/students.sh wrote")
    ap.add_argument("--labels", default="../shared/data/dls/train.csv")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    times = {}
    if (runs / "times.jsonl").is_file():
        for line in (runs / "times.jsonl").read_text().splitlines():
            if line.startswith("{"):
                t = json.loads(line)
                times[t["step"]] = t  # the last one of a step (a resumed step has several)
    teacher = runs / "teacher"
    students = sorted((p for p in runs.glob("student*") if (p / "summary.json").is_file()),
                      key=lambda p: -int(p.name.removeprefix("student")))
    rows = [row(teacher, args.labels, None, times)] + [row(s, args.labels, teacher, times) for s in students]
    t = rows[0]
    print(f"{runs}: folds {t['folds']}, {t['rows']} out-of-fold rows; speed: infer predict on "
          f"{t.get('predict_rows', '?')} test rows, CPU")
    print("| model | layers | base params | adapter MiB | EM @0.5 | EM cascade | of teacher | cascade vs teacher "
          "(95% CI) | rows/s | speed-up | load s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = r.get("vs_teacher", {}).get("default cascade")
        ci = f"{v['difference']:+.4f} ({v['low']:+.4f} .. {v['high']:+.4f})" if v else "-"
        speed = r.get("rows_per_s")
        up = f"{speed / t['rows_per_s']:.2f}x" if speed and t.get("rows_per_s") else "-"
        rss = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "-"
        print(f"| {Path(r['run']).name} | {r['layers']} | {r['base_params'] / 1e6:.1f}M | {r['adapter_mib']:.1f} | "
              f"{r['em_0.5']:.4f} | {r['em_cascade']:.4f} | {r['em_cascade'] / t['em_cascade']:.1%} | {ci} | "
              f"{speed or '-'} | {up} | {r.get('load_s', '-')} | {rss} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
