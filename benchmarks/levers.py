"""The figures of ``bash benchmarks/levers.sh RUNS``: each lever against the shipped config on the same rows.

Usage:
    python -m benchmarks.levers RUNS [--labels ../shared/data/dls/train.csv] [--json out.json]
    python -m benchmarks.levers subset FULL_OOF ROWS_OF OUT      # FULL_OOF cut to the rows of ROWS_OF (same meta)
    python -m benchmarks.levers join RUN_A RUN_B OUT             # two runs of one config on other folds, as one run
    python -m benchmarks.levers archive RUNS DEST                # the OOF files, gzipped, to keep in the repository
    python -m benchmarks.levers unpack SET.tar.gz DEST           # an archived set extracted to DEST/SET
    python -m benchmarks.levers pack FOLDER SET.tar.gz           # a folder of archived runs as one set file

RUNS is a folder of runs, or an archived set (``benchmarks/oof/levers_f01.tar.gz``: read as it is, extracted to a
temporary folder); ``archive RUNS benchmarks/oof/NAME.tar.gz`` writes one such file (a folder DEST: the files loose).

Per run (a ``python -m train`` run folder with ``oof.csv``, or an OOF file such as the blend's): out-of-fold exact
match at 0.5, with the default cascade, with the tuned cascade and with set decoding (both nested: tuned on the other
folds, the left-out fold scored, rotated, over the base run's ``folds.csv``), micro-F1 (cascade), the exact match of
the rows with one and with two true labels and the mean F1 of the rare classes (at least one and at most 1% of the
rows positive; all three with the default cascade, ``infer evaluate``'s breakdowns), and the paired difference to the
base run on the same rows (default cascade; 95% bootstrap interval, ``infer evaluate --baseline``).
Each LLM run whose rows are the TF-IDF file's also gets a row blended with TF-IDF, everything nested (weights, then the
cascade / set decoding, tuned on the other folds: ``infer blend --tune-decoding sets``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from core.io import align_ids, meta_path, read_folds, read_probs, write_json, write_probs

RUNS = ("base", "ens", "tfstudent", "dapt2", "ep3", "lora32", "lora64", "loraplus", "headlr", "headdesc", "combo",
        "combohd", "posw", "focal", "asl", "combohd_posw", "combohd_focal", "combohd_asl", "combohd_ens", "combohd_ep4",
        "combohd_dapt2ep", "combohd_headlr3e-3", "combohd_meanpool",
        "combohd_16bit", "combohd_cue")
"""Run folders in table order, each followed by its other-seed runs (``<run>_seed<N>``); ``seed<N>`` folders (the
shipped config, ``train.seed=N``, base's split) come last. Each run with seeds is also scored as their average."""
FILES = {"tfidf (base's rows)": "tfidf_base_rows.csv", "blend base + tfidf": "blend_oof.csv"}


def subset(full: str, rows_of: str, out: str) -> None:
    """Write ``full`` cut to the ids of ``rows_of`` (in ``rows_of``'s order), keeping ``full``'s meta."""
    ids, p, names = read_probs(full)
    want, _, _ = read_probs(rows_of)
    idx = align_ids(rows_of, want, full, ids)
    write_probs(out, ids[idx], p[idx], names, meta={**carried_meta(full), "subset_of": full, "rows_of": rows_of})


def join(run_a: str, run_b: str, out: str) -> None:
    """Write ``out``, one run folder holding the out-of-fold rows of ``run_a`` and ``run_b``: the same config and
    split, other folds (e.g. an archived folds 0-1 screen and its folds 2-4 run later). The configs their OOF files
    record may differ only where a resumed run's may (``train.checkpoint.RESUME_FREE``: ``cv.folds``, ``output_dir``
    ...), their ``folds.csv`` not at all, and no row may be in both."""
    from train.checkpoint import changes, describe

    a, b, dest = Path(run_a), Path(run_b), Path(out)
    metas = [carried_meta(oof_file(run)) for run in (a, b)]
    refused, _ = changes(metas[0].get("config", {}), metas[1].get("config", {}))
    refused += [(k, metas[0].get(k), metas[1].get(k)) for k in ("model", "adapter", "produced_by")
                if metas[0].get(k) != metas[1].get(k)]  # what the config does not say (TF-IDF's C, which adapter)
    if refused:
        raise SystemExit(f"join: {a} and {b} are runs of different configs ({describe(refused)})")
    if (a / "folds.csv").read_bytes() != (b / "folds.csv").read_bytes():
        raise SystemExit(f"join: {a / 'folds.csv'} and {b / 'folds.csv'} differ: not the same split")
    ids_a, p_a, names = read_probs(oof_file(a))
    ids_b, p_b, _ = read_probs(oof_file(b), names)
    both = set(ids_a.tolist()) & set(ids_b.tolist())
    if both:
        raise SystemExit(f"join: {len(both)} out-of-fold row(s) in both runs, e.g. id {min(both)}")
    folds = sorted({*json.loads((a / "summary.json").read_text())["folds"],
                    *json.loads((b / "summary.json").read_text())["folds"]})
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("folds.csv", "run_config.yaml", "label_names.json"):
        if (a / f).is_file():
            shutil.copyfile(a / f, dest / f)
    meta = {**metas[0], "joined_from": [str(oof_file(a)), str(oof_file(b))]}
    if "folds" in meta:
        meta["folds"] = folds
    write_probs(dest / "oof.csv", np.concatenate([ids_a, ids_b]), np.concatenate([p_a, p_b]), names, meta=meta)
    write_json(dest / "summary.json", {"folds": folds, "rows": len(ids_a) + len(ids_b), "joined_from": [str(a), str(b)]})


def carried_meta(path) -> dict:
    """The meta of the probability file ``path`` that a file derived from it keeps (its run's config, so its
    decode.fallback); what ``write_probs`` writes anew (label names, rows, versions) left out."""
    mp = meta_path(path)
    meta = json.loads(mp.read_text()) if mp.is_file() else {}
    return {k: v for k, v in meta.items() if k not in ("label_names", "rows", "versions")}


SEED_RUN = re.compile(r"(?:(?P<run>.+)_)?seed(?P<n>\d+)")
"""Another seed's run of a lever on its split: ``<run>_seed<N>`` (``train.seed=N``), or ``seed<N>`` for the base's."""


def seed_runs(names, of: str | None) -> list[str]:
    """The names of ``names`` that are other-seed runs of ``of`` (None: the base's ``seed<N>``), by N."""
    runs = [(int(m["n"]), n) for n in names if (m := SEED_RUN.fullmatch(n)) and m["run"] == of]
    return [n for _, n in sorted(runs)]


def run_names(runs: Path) -> list[str]:
    """The finished runs of ``runs``: ``RUNS`` in order, each followed by its ``<run>_seed<N>`` runs by N, then the
    base's ``seed<N>`` runs by N."""
    found = [p.name for p in runs.iterdir() if (p / "summary.json").is_file()] if runs.is_dir() else []
    order = [n for r in RUNS for n in (r, *seed_runs(found, r))] + seed_runs(found, None)
    return [n for n in order if n in found]


def average(oofs: list[Path], out: Path) -> None:
    """The mean of the probability files ``oofs`` (rows of the first) written to ``out``: the seeds' average. It keeps
    the first file's config (:func:`carried_meta`), so it decodes as its runs do (``decode.fallback``)."""
    from infer.blend import blend_probs

    ids, first, names = read_probs(oofs[0])
    probs = [first]
    for o in oofs[1:]:
        o_ids, p, _ = read_probs(o, names)
        probs.append(p[align_ids(oofs[0], ids, o, o_ids)])
    write_probs(out, ids, blend_probs(probs, [1.0] * len(probs)), names,
                meta={**carried_meta(oofs[0]), "mean_of": [str(o) for o in oofs]})


def oof_file(folder: Path, name: str = "oof.csv") -> Path:
    """``name`` in ``folder``, or its gzipped copy (an archived run)."""
    plain = folder / name
    return plain if plain.is_file() else folder / f"{name}.gz"


def _gzip_with_meta(src: Path, dst: Path) -> None:
    """``src`` gzipped to ``dst``, its ``.meta.json`` sidecar beside it when there is one. The gzip header carries
    no time (as ``core.io.write_csv``'s): the same runs archive to the same bytes."""
    with open(src, "rb") as fin, gzip.GzipFile(dst, "wb", mtime=0) as fout:
        shutil.copyfileobj(fin, fout)
    if meta_path(src).is_file():
        shutil.copyfile(meta_path(src), meta_path(dst))


def archive(runs: str, dest: str) -> None:
    """Copy what the figures need (OOF probabilities gzipped + sidecar, folds, config, summary) of every finished
    run and OOF file of ``runs`` to ``dest``, so that a later session scores or blends them without training again.
    A ``dest`` ending in ``.tar.gz`` is written as one archived set (``pack``), else as a folder."""
    runs, dest = Path(runs), Path(dest)
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        folder = Path(tmp) / dest.name.removesuffix(SET_SUFFIX) if is_set_file(dest) else dest
        names = run_names(runs) + ["tfidf"] * (runs / "tfidf").is_dir()
        for n in names:
            (folder / n).mkdir(parents=True, exist_ok=True)
            for f in ("folds.csv", "run_config.yaml", "summary.json", "label_names.json"):
                if (runs / n / f).is_file():
                    shutil.copyfile(runs / n / f, folder / n / f)
            _gzip_with_meta(runs / n / "oof.csv", folder / n / "oof.csv.gz")
        for f in FILES.values():
            if (runs / f).is_file():
                _gzip_with_meta(runs / f, folder / f"{f}.gz")
        if folder != dest:
            pack(folder, dest)
    print(f"archived {names} and {[f for f in FILES.values() if (runs / f).is_file()]} to {dest}")


SET_SUFFIX = ".tar.gz"
"""An archived set (``benchmarks/oof/<set>.tar.gz``): one gzipped tar whose members sit under ``<set>/``."""


def is_set_file(path) -> bool:
    return str(path).endswith(SET_SUFFIX)


def pack(folder, dest) -> None:
    """``folder`` written as the archived set ``dest`` (``<name>.tar.gz``, members under ``<name>/``), sorted, with
    no owner, time or file name in the headers: the same files always give the same bytes."""
    folder, dest = Path(folder), Path(dest)
    if not is_set_file(dest):
        raise ValueError(f"{dest}: an archived set is named <set>{SET_SUFFIX}")
    top = dest.name.removesuffix(SET_SUFFIX)

    def bare(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = info.mtime = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for p in [folder, *sorted(folder.rglob("*"))]:
            tar.add(p, arcname=str(Path(top, p.relative_to(folder))), recursive=False, filter=bare)


def unpack(archived, dest) -> Path:
    """Extract the archived set ``archived`` (``<set>.tar.gz``) into ``dest``; returns ``dest/<set>``. Members
    outside ``<set>/``, links and devices are refused."""
    archived, dest = Path(archived), Path(dest)
    top = archived.name.removesuffix(SET_SUFFIX)
    with tarfile.open(archived, "r:gz") as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if Path(m.name).is_absolute() or ".." in parts or parts[:1] != (top,) or not (m.isfile() or m.isdir()):
                raise ValueError(f"{archived}: member {m.name!r} is not a file or folder under {top}/")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, **kw)
    return dest / top


def set_folder(path, into) -> Path:
    """The folder ``path`` names: ``path`` itself, or for an archived set ``X/<set>.tar.gz`` (or a run in one,
    ``X/<set>.tar.gz/<run>``, as ``X/<set>/<run>`` was before the set was packed) the set extracted into ``into``
    and that folder in it."""
    s = str(path)
    at = s.find(SET_SUFFIX + "/")
    archived, inner = (s, "") if at < 0 else (s[:at + len(SET_SUFFIX)], s[at + len(SET_SUFFIX) + 1:])
    if not is_set_file(archived):
        return Path(path)
    if not Path(archived).is_file():
        raise FileNotFoundError(f"{archived}: no such archived set")
    root = unpack(archived, into)
    return root / inner if inner else root


def figures(oof: Path, labels: str, folds: Path, baseline: Path | None, work: Path) -> dict:
    """Exact match (0.5, cascade, tuned nested, sets nested), the cascade's exact match on 1- and 2-label rows and
    its rare / frequent classes' mean F1, and the paired difference to ``baseline``."""
    from core.tuning import run_tune
    from infer.evaluate import evaluate

    res = evaluate(oof, labels, out_dir=work, baseline=baseline)
    m = res["metrics"]
    ids, _, _ = read_probs(oof)
    fold_of = read_folds(folds, oof, ids)
    out = {"oof": str(oof), "rows": res["rows"], "folds": sorted({int(f) for f in fold_of}),
           "em_0.5": m["threshold 0.5"]["exact_match"], "em_cascade": m["default cascade"]["exact_match"],
           "micro_f1": m["default cascade"]["micro_f1"], "em_tuned_nested": None, "em_sets_nested": None,
           **cascade_breakdown(res)}
    if len(out["folds"]) > 1:  # a nested estimate needs two folds
        dec = run_tune(oof, labels, work / "thresholds_sets.json", folds=folds, strategy="sets", progress=False)
        nested = dec.meta["nested"]
        out.update(em_tuned_nested=nested["pooled"]["tuned"]["exact_match"],
                   em_sets_nested=nested["pooled"]["sets"]["exact_match"], per_fold=nested["per_fold"])
    if baseline is not None:
        out["vs_base"] = res["baseline"]["default cascade"]
    return out


def cascade_breakdown(res: dict) -> dict:
    """From an ``infer evaluate`` result, the default cascade's exact match on the rows with one (``em_1label``) and
    two (``em_2label``) true labels, and the mean F1 of its rare and frequent classes (``rare_f1``, ``frequent_f1``;
    ``rare_classes``: how many are rare). ``None`` where a group is empty."""
    groups = {g["labels"]: g["exact_match"] for g in res["by_label_count"]["default cascade"]}
    rare = res["rare_class_f1"]["default cascade"]
    return {"em_1label": groups.get("1"), "em_2label": groups.get("2"), "rare_f1": rare["rare"]["mean_f1"],
            "frequent_f1": rare["frequent"]["mean_f1"], "rare_classes": rare["rare"]["classes"]}


def blend_figures(oofs: list[Path], labels: str, folds: Path) -> dict:
    """The honest figures of blend + tune: weights, then the cascade / set decoding, tuned on all folds but one
    (``infer blend --tune-decoding sets``)."""
    from infer.blend import run_blend

    res = run_blend(None, [str(o) for o in oofs], labels, folds=folds, tune_decoding="sets", progress=False)
    dec = res["nested"]["decoding"]
    ids, _, _ = read_probs(oofs[0])
    return {"oof": ",".join(map(str, oofs)), "rows": len(ids), "folds": sorted({int(f) for f in read_folds(folds,
            oofs[0], ids)}), "em_0.5": None, "em_cascade": dec["pooled"]["default"]["exact_match"],
            "micro_f1": dec["pooled"]["default"]["micro_f1"],
            "em_tuned_nested": dec["pooled"]["tuned"]["exact_match"],
            "em_sets_nested": dec["pooled"]["sets"]["exact_match"], "weights": [r["weights"] for r in
                                                                             res["nested"]["per_fold"]],
            "em_1label": None, "em_2label": None, "rare_f1": None, "frequent_f1": None, "rare_classes": None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tools = {"subset": (subset, "FULL_OOF ROWS_OF OUT"), "join": (join, "RUN_A RUN_B OUT"), "archive": (archive, "RUNS DEST"),
             "unpack": (unpack, "SET.tar.gz DEST"), "pack": (pack, "FOLDER SET.tar.gz")}
    if argv[:1] and argv[0] in tools:
        fn, usage = tools[argv[0]]
        if len(argv) - 1 != len(usage.split()):
            print(f"usage: python -m benchmarks.levers {argv[0]} {usage}", file=sys.stderr)
            return 2
        fn(*argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the folder benchmarks/levers.sh wrote, or an archived set (SET.tar.gz)")
    ap.add_argument("--labels", default="../shared/data/dls/train.csv")
    ap.add_argument("--base", default="base", help="the run every other is paired with (default base; e.g. bf16: "
                                                  "the shipped config in CPU bf16, for the bf16 levers)")
    ap.add_argument("--only", help="comma-separated runs to list besides the base (default: all)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--work", help="folder for the evaluation files and tuned decoders (default: RUNS/eval; for an "
                                   "archived set a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        runs = set_folder(args.runs, Path(tmp))
        work = Path(args.work) if args.work else (Path(tmp) if is_set_file(args.runs) else runs) / "eval"
        return table(args, runs, work)


def table(args: argparse.Namespace, runs: Path, work: Path) -> int:
    """Score every run of ``runs`` (a folder) and print the paired table."""
    base = runs / args.base
    folds = base / "folds.csv"
    if not oof_file(base).is_file() or not folds.is_file():
        raise SystemExit(f"{base}: no base run there (oof.csv[.gz] and folds.csv; --base names one)")
    only = set(args.only.split(",")) if args.only else None
    names = [args.base] + [n for n in run_names(runs) if n not in ("base", args.base) and (only is None or n in only)]
    items = [(name, oof_file(runs / name), work / name) for name in names]
    for of in [None, *RUNS]:  # the seeds lever: a run and its other-seed runs averaged
        seeds, first = seed_runs(names, of), args.base if of is None else of
        if not seeds or not oof_file(runs / first).is_file():
            continue
        work.mkdir(parents=True, exist_ok=True)
        mean, stem = f"mean of {first} + {' + '.join(seeds)}", "seeds_mean" if of is None else f"{of}_seeds_mean"
        average([oof_file(runs / first), *(oof_file(runs / n) for n in seeds)], work / f"{stem}.csv")
        items.append((mean, work / f"{stem}.csv", work / stem))
        names.append(mean)
    items += [(name, oof_file(runs, f), work / Path(f).stem) for name, f in FILES.items()
              if oof_file(runs, f).is_file() and (only is None or Path(f).stem in only)]
    rows = []
    for name, oof, item_work in items:
        item_work.mkdir(parents=True, exist_ok=True)
        r = figures(oof, args.labels, folds, None if name == args.base else oof_file(base), item_work)
        rows.append({"name": name, **r})
    tfidf = oof_file(runs, FILES["tfidf (base's rows)"])
    if tfidf.is_file() and len(rows[0]["folds"]) > 1:  # LLM + TF-IDF blends on the same rows, everything nested
        want = set(read_probs(tfidf)[0].tolist())
        for r in list(rows):
            if r["name"] in names and set(read_probs(r["oof"])[0].tolist()) == want:
                rows.append({"name": f"blend {r['name']} + tfidf, nested weights + decoding",
                             **blend_figures([Path(r["oof"]), tfidf], args.labels, folds)})
    b = rows[0]
    print(f"{Path(args.runs)}: base {b['rows']} out-of-fold rows (folds {b['folds']} of {args.labels}); nested = tuned on "
          f"the other folds, the left-out fold scored; 'vs base': the same rows, paired; EM 1 / 2 labels: the "
          f"cascade's exact match on the rows with one / two true labels; rare F1: the cascade's mean F1 over the "
          f"classes at most 1% of the rows have ({b['rare_classes']} classes on base's rows)")
    print("| run | folds | EM @0.5 | EM cascade | EM tuned (nested) | EM sets (nested) | micro-F1 | EM 1 label | "
          "EM 2 labels | rare F1 | cascade vs base (95% CI) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def f4(v):
        return "-" if v is None else f"{v:.4f}"

    for r in rows:
        v = r.get("vs_base")
        vs = "-" if v is None else f"{v['difference']:+.4f} ({v['low']:+.4f} .. {v['high']:+.4f})"
        print(f"| {r['name']} | {','.join(map(str, r['folds']))} | {f4(r['em_0.5'])} | {r['em_cascade']:.4f} | "
              f"{f4(r['em_tuned_nested'])} | {f4(r['em_sets_nested'])} | {r['micro_f1']:.4f} | {f4(r['em_1label'])} | "
              f"{f4(r['em_2label'])} | {f4(r['rare_f1'])} | {vs} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
