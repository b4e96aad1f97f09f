"""The figures of ``bash benchmarks/students.sh RUNS``: teacher vs distilled pruned students, side by side.

Usage:
    python -m benchmarks.students runs/students [--labels ../shared/data/dls/train.csv] [--json out.json]
    python -m benchmarks.students runs/students_f1 --pool benchmarks/oof/students_f0.tar.gz \
        --pool-teacher benchmarks/oof/levers_f01.tar.gz/seed7   # + the same models' OOF rows of other folds

Per model: decoder layers, MLP channels kept and parameters of its base, adapter weight size, out-of-fold exact match
(0.5, the run's default cascade, and with two folds or more the tuned cascade and set decoding, nested: tuned on the
other folds, the left-out fold scored) on the folds the students trained (a teacher with more folds is cut to their
rows; ``--pool DIR``: each model's rows joined with the rows of DIR/<model>/oof.csv[.gz] from other folds, e.g. an
archived set of the same students on fold 0, ``SET.tar.gz`` or ``SET.tar.gz/RUN`` read as it is, the split checked
equal), the paired difference to the teacher on the
same rows (95% bootstrap interval, ``infer evaluate --baseline``), the student's cascade exact match as a fraction of
the teacher's, and CPU ``infer predict`` speed on the same rows (rows/s without model loading, load seconds, peak RSS
of the process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.levers import carried_meta, figures, set_folder
from benchmarks.vocab import safetensors_params
from core.adapter import finished_folds
from core.config import RunConfig
from core.io import meta_path, read_probs, write_probs


def oof_file(run: Path) -> Path:
    """A run's OOF file: ``oof.csv`` in a run folder, ``oof.csv.gz`` in an archived one."""
    for name in ("oof.csv", "oof.csv.gz"):
        if (run / name).is_file():
            return run / name
    raise FileNotFoundError(f"{run}: no oof.csv or oof.csv.gz")


def pooled(run: Path, other: Path, out: Path) -> Path:
    """``run``'s OOF rows joined with the rows of ``other`` (the same model on other folds) that ``run`` lacks,
    written to ``out`` with ``run``'s meta; both must come from the same split (``folds.csv`` equal)."""
    import pandas as pd

    a, b = pd.read_csv(run / "folds.csv"), pd.read_csv(other / "folds.csv")
    if not a.sort_values("index").reset_index(drop=True).equals(b.sort_values("index").reset_index(drop=True)):
        raise ValueError(f"{run}/folds.csv and {other}/folds.csv are different splits: no pooling")
    src, o_src = oof_file(run), oof_file(other)
    ids, p, names = read_probs(src)
    o_ids, o_p, _ = read_probs(o_src, names)
    new = ~np.isin(o_ids, ids)
    write_probs(out, np.concatenate([ids, o_ids[new]]), np.concatenate([p, o_p[new]]), names,
                meta={**carried_meta(src), "pooled_from": [str(src), f"{o_src} ({int(new.sum())} rows)"]})
    return out


def base_folder(run: Path) -> Path:
    from core.model import resolve_model_path

    cfg = RunConfig.from_yaml(run / "run_config.yaml")
    return Path(resolve_model_path(cfg.model, log=lambda m: None))


def row(run: Path, labels: str, teacher: Path | None, times: dict, work: Path, rows_of: Path | None = None,
        pool: Path | None = None) -> dict:
    """One model's figures; ``rows_of``: an OOF file whose rows the run's OOF is cut to first (a teacher that
    trained more folds than the students is scored on the students' rows only); ``pool``: the same model's run on
    other folds, whose rows are added first; ``teacher``: the teacher's (pooled, cut) OOF file."""
    from benchmarks.levers import subset

    base = base_folder(run)
    layers = json.loads((base / "config.json").read_text()).get("num_hidden_layers")
    folds = finished_folds(run, "last")
    adapter = folds[0][1] / "last"
    work.mkdir(parents=True, exist_ok=True)
    oof = oof_file(run) if pool is None else pooled(run, pool, work / "oof_pooled.csv")
    if rows_of is not None:
        subset(str(oof), str(rows_of), str(work / "oof_rows.csv"))
        oof = work / "oof_rows.csv"
    f = figures(oof, labels, run / "folds.csv", teacher, work)
    out = {"run": str(run), "layers": layers, "base_params": safetensors_params(base),
           "adapter_mib": sum(p.stat().st_size for p in adapter.glob("*.safetensors")) / 2**20,
           "folds": f["folds"], "rows": f["rows"], "em_0.5": f["em_0.5"], "em_cascade": f["em_cascade"],
           "em_tuned_nested": f["em_tuned_nested"], "em_sets_nested": f["em_sets_nested"], "oof": str(oof)}
    prune_report = base / "prune_report.json"
    if prune_report.is_file():
        out["mlp_keep"] = json.loads(prune_report.read_text()).get("mlp", {}).get("keep_fraction")
    if teacher is not None:
        out["vs_teacher"] = f["vs_base"]
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
    ap.add_argument("--work", help="folder for the evaluation files and tuned decoders (default: RUNS/eval)")
    ap.add_argument("--pool", type=Path, help="a folder with the same students' runs (or archived OOF) on other "
                                              "folds, or an archived set (SET.tar.gz)")
    ap.add_argument("--pool-teacher", type=Path, help="the teacher's run (or archived OOF) on those folds, or one "
                                                      "in an archived set (SET.tar.gz/RUN)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="students-") as tmp:  # archived sets are extracted here
        if args.pool is not None:
            args.pool = set_folder(args.pool, Path(tmp) / "pool")
        if args.pool_teacher is not None:
            args.pool_teacher = set_folder(args.pool_teacher, Path(tmp) / "pool_teacher")
        return table(args)


def table(args: argparse.Namespace) -> int:
    """Score the teacher and every finished student of ``args.runs`` and print the table."""
    runs = Path(args.runs)
    times = {}
    if (runs / "times.jsonl").is_file():
        for line in (runs / "times.jsonl").read_text().splitlines():
            if line.startswith("{"):
                t = json.loads(line)
                times[t["step"]] = t  # the last one of a step (a resumed step has several)
    teacher = runs / "teacher"
    work = Path(args.work) if args.work else runs / "eval"
    students = sorted((p for p in runs.glob("student*") if (p / "summary.json").is_file()),
                      key=lambda p: (-int(p.name.removeprefix("student").split("_")[0]), p.name))
    if not students:
        print(f"{runs}: no finished student run (student*/summary.json)", file=sys.stderr)
        return 1
    pools = {}
    for s in students:
        if args.pool is not None:
            pools[s] = args.pool / s.name
            if not pools[s].is_dir():
                print(f"{pools[s]}: not found (--pool has no run of {s.name})", file=sys.stderr)
                return 1
    first = students[0]
    work.mkdir(parents=True, exist_ok=True)
    rows_of = oof_file(first) if args.pool is None else pooled(first, pools[first], work / "rows_of.csv")
    t = row(teacher, args.labels, None, times, work / "teacher", rows_of, pool=args.pool_teacher)
    rows = [t] + [row(s, args.labels, Path(t["oof"]), times, work / s.name, pool=pools.get(s)) for s in students]
    t = rows[0]
    print(f"{runs}: folds {t['folds']}, {t['rows']} out-of-fold rows; nested = tuned on the other folds, the "
          f"left-out fold scored; speed: infer predict on {t.get('predict_rows', '?')} test rows, CPU")
    print("| model | layers | MLP kept | base params | adapter MiB | EM @0.5 | EM cascade | EM tuned (nested) | "
          "EM sets (nested) | of teacher (cascade / tuned) | cascade vs teacher (95% CI) | rows/s | speed-up | "
          "load s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def f4(v):
        return "-" if v is None else f"{v:.4f}"

    for r in rows:
        v = r.get("vs_teacher")  # default cascade, paired
        ci = f"{v['difference']:+.4f} ({v['low']:+.4f} .. {v['high']:+.4f})" if v else "-"
        speed = r.get("rows_per_s")
        up = f"{speed / t['rows_per_s']:.2f}x" if speed and t.get("rows_per_s") else "-"
        rss = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "-"
        frac = f"{r['em_cascade'] / t['em_cascade']:.1%}"
        if r["em_tuned_nested"] is not None:
            frac += f" / {r['em_tuned_nested'] / t['em_tuned_nested']:.1%}"
        print(f"| {Path(r['run']).name} | {r['layers']} | {r.get('mlp_keep') or '-'} | {r['base_params'] / 1e6:.1f}M "
              f"| {r['adapter_mib']:.1f} | {f4(r['em_0.5'])} | {r['em_cascade']:.4f} | {f4(r['em_tuned_nested'])} | "
              f"{f4(r['em_sets_nested'])} | {frac} | {ci} | {speed or '-'} | {up} | {r.get('load_s', '-')} | {rss} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
