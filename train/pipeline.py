"""The best pipeline in one command (``python -m train pipeline``): trim-vocab -> DAPT -> CV (seeds, variants) ->
final fit / merged adapter -> predict -> TF-IDF -> blend -> tune -> submit, each step the toolkit's own command.

Every step is the command a user types (``python -m train ...`` / ``python -m infer ...``, docs/pipeline.md), run in
a subprocess of this interpreter with its output streamed and kept in ``RUN/logs/<step>.log``. The pipeline adds
three things around them:

* **Skip what is done.** A step is skipped when its output is complete (what "complete" means per step:
  :func:`plan`: the file a command writes last, e.g. ``summary.json`` of a CV with every configured fold, an adapter
  folder's ``adapter_config.json``, a probability file and its ``.meta.json``) *and* ``RUN/pipeline.json`` records
  that the same command made it after the steps it reads from. A half-done step resumes (CV and DAPT with
  ``--resume``).
* **Never keep a stale output.** A complete output made by another command, or before a step it reads from was
  redone, is redone: a file is rewritten, a cheap folder (vocabulary, TF-IDF, merge) replaced, a CV resumed with its
  own checks (``--resume`` refuses a change of what it computes, naming the keys); a DAPT adapter, or a CV whose
  inputs changed, is never thrown away: the pipeline refuses before running anything and names the folder to delete.
* **One table.** Every step's status (ran / skipped / failed / not run), time and figure (CV exact match, blend and
  tune's nested figures, rows predicted, the submission's path).

Layout of ``RUN``: ``base/`` (trimmed model), ``dapt/``, ``cv/`` (the first seed), ``cv-seed<N>/`` (the others),
``cv-<name>/`` (``cv.variants``), ``merged/``, ``probs/<model>.csv`` (test probabilities), ``tfidf/``, ``blend.csv`` /
``blend_oof.csv``, ``thresholds.json``, ``submission.csv``, ``logs/``, ``pipeline.json`` (what ran, when, by which
command) and ``pipeline_config.yaml`` (the resolved pipeline config).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml

from core.adapter import FINAL_ADAPTER, final_adapter
from core.config import RunConfig
from core.errors import ConfigError, InputError
from core.io import check_out_dir, meta_path, versions, write_json, write_text
from train.pipeline_config import PipelineConfig

logger = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
DAPT_READS = ("model.", "quantization.", "lora.", "data.text_template", "data.max_length", "train.")
"""The sections and keys of a run config DAPT uses (its module doc): only these CV overrides reach DAPT's command
when it shares the CV's config, so that e.g. more CV folds leave a finished DAPT adapter current."""
CONFIG_FILE = "pipeline_config.yaml"


# ------------------------------------------------------------------------------------------------------- the plan


@dataclass
class Step:
    """One command of the pipeline and how to tell that its output is done."""

    name: str
    argv: list[str]
    """The command after the interpreter: ``["-m", "train", ...]`` (what ``RUN/pipeline.json`` records)."""
    output: Path
    complete: Callable[[], bool]
    """True when the output is whole (the file the command writes last is there)."""
    figure: Callable[[], str]
    """The step's figure, read from its output (called only when complete)."""
    needs: tuple[str, ...] = ()
    """Earlier steps whose outputs it reads: when one of them is redone, so is this one."""
    redo: Literal["rerun", "replace", "resume", "refuse"] = "rerun"
    """A complete but stale output: ``rerun`` (the command overwrites it), ``replace`` (the folder is removed
    first), ``resume`` (``--resume``, the command's own checks decide; when only the command changed, else as
    ``refuse``), ``refuse`` (never thrown away: the pipeline stops before running anything)."""
    resumable: bool = False
    """A half-done output continues with ``--resume``."""


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _path_override(key: str, path: str | Path) -> str:
    """``key=path`` as ``--set`` parses it back to the same string (quoted as JSON, which is YAML, where needed)."""
    path = str(path)
    return f"{key}={path if yaml.safe_load(path) == path else json.dumps(path)}"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _probs_done(path: Path) -> Callable[[], bool]:
    return lambda: path.is_file() and meta_path(path).is_file()  # write_probs writes the meta last


def _cv_figure(run: Path) -> str:
    s = _read_json(run / "summary.json")
    m = s["oof_metrics"]
    fig = f"exact match {m['cascade/exact_match']:.4f} cascade"
    if "sets/exact_match" in m:
        fig += f", {m['sets/exact_match']:.4f} sets"
    return fig + f" (OOF, folds {','.join(map(str, s['folds']))}, {s['rows']} rows)"


def _blend_figure(path: Path) -> str:
    """The blend's honest figures: its nested rows (the decoding tuned inside them where it was)."""
    rows = _read_json(meta_path(path))["oof_scores"]
    tuned = [k for k in ("blend + tuned cascade (nested)", "blend + sets (nested)") if k in rows]
    shown = tuned or [k for k in ("blend (nested)",) if k in rows]
    parts = [f"{rows[k]['exact_match']:.4f} ({k.removesuffix(' (nested)')})" for k in shown]
    return "nested exact match " + ", ".join(parts) if parts else "no nested estimate"


def _tune_figure(path: Path) -> str:
    meta = _read_json(path)["meta"]
    nested = meta.get("nested")
    if not nested:
        return f"{meta.get('strategy', 'cascade')} decoding (no nested estimate)"
    pooled, obj = nested["pooled"], nested["objective"]
    fig = f"nested {obj} {pooled['default'][obj]:.4f} default -> {pooled['tuned'][obj]:.4f} tuned cascade"
    return fig + (f", {pooled['sets'][obj]:.4f} sets" if "sets" in pooled else "")


def _submission_figure(path: Path) -> str:
    with path.open(encoding="utf-8") as f:
        rows = sum(1 for _ in f) - 1
    return f"{rows} rows -> {path}"


@dataclass
class Model:
    """An LLM of the blend: its test probabilities come from ``adapter``, its OOF from ``oof``."""

    name: str
    run: Path
    step: str | None
    """The step that trains it (``None``: a finished run given in ``runs``)."""


def resolve_runs(cfg: PipelineConfig) -> list[Path]:
    """The local folders of ``cfg.runs``: paths as they are, Hub ids from the local cache (``infer pull`` first)."""
    from core.hub import resolve_adapter

    return [resolve_adapter(r) for r in cfg.runs]


def resolve_run_config(cfg: PipelineConfig, runs: list[Path]) -> tuple[str | None, list[str], RunConfig]:
    """The run config every config-driven step gets (path, overrides) and what it resolves to."""
    path = cfg.config
    if path is None and runs:
        path = str(runs[0] / "run_config.yaml")
    overrides = list(cfg.overrides)
    if cfg.train_csv:
        overrides.append(_path_override("data.train_csv", cfg.train_csv))
    if cfg.label_names_csv:
        overrides.append(_path_override("data.label_names_csv", cfg.label_names_csv))
    return path, overrides, RunConfig.from_yaml(path, overrides)


def plan(cfg: PipelineConfig, out: str | Path) -> list[Step]:
    """The steps of ``cfg`` in order, each with the command a user would type (see the module doc)."""
    out = Path(out)
    runs = resolve_runs(cfg)
    config, user, run_cfg = resolve_run_config(cfg, runs)
    config_args = ["--config", config] if config else []
    labels = run_cfg.data.train_csv
    test = cfg.test_csv
    steps: list[Step] = []
    pre: list[str] = []  # overrides that make the CV start from what trim-vocab and DAPT made
    pre_steps: tuple[str, ...] = ()

    if cfg.trim_vocab.enabled:
        base = out / "base"
        corpus = list(dict.fromkeys([labels, *([test] if test else []), *cfg.trim_vocab.corpus,
                                     *(_dapt_corpus(cfg) if cfg.dapt.enabled else [])]))
        argv = ["-m", "train", "trim-vocab", *config_args, *[a for c in corpus for a in ("--corpus", c)]]
        as_file = RunConfig.from_yaml(config)  # what trim-vocab reads from --config: name what the overrides change
        if run_cfg.model.name_or_path != as_file.model.name_or_path:
            argv += ["--model", run_cfg.model.name_or_path]
        if run_cfg.data.text_template != as_file.data.text_template:
            argv += ["--template", run_cfg.data.text_template.replace("\n", "\\n").replace("\t", "\\t")]
        report = base / "trim_report.json"
        steps.append(Step("trim-vocab", argv + ["--out", str(base)], base, report.is_file,
                          lambda: _trim_figure(report), redo="replace"))
        pre.append(_path_override("model.name_or_path", base))
        pre_steps += ("trim-vocab",)

    if cfg.dapt.enabled:
        dapt = out / "dapt"
        if cfg.dapt.config is None:  # the CV's config, and of its overrides those DAPT reads (not cv.folds, ...)
            dargs = [*config_args, *_sets([o for o in user if o.startswith(DAPT_READS) and not o.startswith(
                "lora.init_adapter")] + pre + cfg.dapt.overrides)]
        else:
            dargs = ["--config", cfg.dapt.config, *_sets(pre + cfg.dapt.overrides)]
        argv = ["-m", "train", "dapt", *dargs, *[a for c in _dapt_corpus(cfg) for a in ("--corpus", c)],
                "--out", str(dapt)]
        if cfg.dapt.eval_rows:
            argv += ["--eval-rows", str(cfg.dapt.eval_rows)]
        info = dapt / "dapt_info.json"
        steps.append(Step("dapt", argv, dapt, info.is_file, lambda: _dapt_figure(info), needs=pre_steps,
                          redo="refuse", resumable=True))
        pre.append(_path_override("lora.init_adapter", dapt))
        pre_steps += ("dapt",)

    models = [Model(f"run{i}" if len(runs) > 1 else "run", r, None) for i, r in enumerate(runs)]
    expected = run_cfg.cv.folds if run_cfg.cv.folds is not None else list(range(run_cfg.cv.n_folds))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.cv.nproc_per_node)] \
        if cfg.cv.nproc_per_node > 1 else []
    for name, member_sets in cv_members(cfg, config, user, run_cfg):
        run = out / name
        argv = [*launcher, "-m", "train", *config_args,
                *_sets(user + pre + member_sets + [_path_override("output_dir", run)])]
        argv += ["--final"] if cfg.cv.final else []
        steps.append(Step(name, argv, run, _cv_done(run, expected, cfg.cv.final), lambda run=run: _cv_figure(run),
                          needs=pre_steps, redo="resume", resumable=True))
        models.append(Model(name, run, name))
    first = models[0].run
    folds_csv = first / "folds.csv"
    llm_steps = tuple(m.step for m in models if m.step)

    if cfg.merge.enabled:
        merged = out / "merged"
        argv = ["-m", "train", "merge", *[a for m in models for a in ("--run", str(m.run))],
                "--method", cfg.merge.method, "--out", str(merged)]
        steps.append(Step("merge", argv, merged, (merged / "adapter_config.json").is_file,
                          lambda: f"{len(models)} run(s) merged into one adapter ({cfg.merge.method})",
                          needs=llm_steps, redo="replace"))

    # The test probabilities of each LLM of the blend (a merged adapter stands for every run it merges).
    tests: list[Path] = []
    if test:
        sources = {"folds": [(m.name, m.run, m.step) for m in models],
                   "final": [(f"{m.name}-final", m.run / FINAL_ADAPTER, m.step) for m in models],
                   "folds+final": [(f"{m.name}+final", f"{m.run},{m.run / FINAL_ADAPTER}", m.step) for m in models],
                   "merged": [("merged", out / "merged", "merge")]}[cfg.predict.model]
        for name, adapter, needs in sources:
            probs = out / "probs" / f"{name}.csv"
            argv = ["-m", "infer", "predict", "--adapter", str(adapter), "--input", test, "--out", str(probs),
                    "--batch-size", str(cfg.predict.batch_size)]
            argv += ["--base-model", cfg.predict.base_model] if cfg.predict.base_model else []
            steps.append(Step(f"predict {name}", argv, probs, _probs_done(probs),
                              lambda probs=probs: _predict_figure(probs), needs=(needs,) if needs else ()))
        tests = [out / "probs" / f"{name}.csv" for name, _, _ in sources]
        if cfg.predict.model == "merged":
            tests = tests * len(models)
    oofs = [m.run / "oof.csv" for m in models]
    predict_steps = tuple(s.name for s in steps if s.name.startswith("predict "))

    if cfg.tfidf.enabled:
        tfidf = out / "tfidf"
        argv = ["-m", "train", "tfidf", *config_args, *_sets(user), "--folds", str(folds_csv),
                *(["--test", test] if test else []), "--out", str(tfidf), "--C", f"{cfg.tfidf.C:g}"]
        done = [tfidf / "summary.json", *([tfidf / "test_probs.csv"] if test else [])]
        steps.append(Step("tfidf", argv, tfidf, lambda: all(p.is_file() for p in done),
                          lambda: _tfidf_figure(tfidf), needs=llm_steps[:1], redo="replace"))
        oofs.append(tfidf / "oof.csv")
        tests += [tfidf / "test_probs.csv"] if test else []

    # What tune and submit read: the blend of every model, or the one LLM's own files.
    probs, oof, probs_from, oof_from = (tests[0] if tests else None), oofs[0], predict_steps, llm_steps
    if len(oofs) > 1:
        blend, blend_oof = out / "blend.csv", out / "blend_oof.csv"
        argv = ["-m", "infer", "blend", *(["--probs", ",".join(map(str, tests))] if test else []),
                "--oof", ",".join(map(str, oofs)), "--labels", labels, "--folds", str(folds_csv),
                *(["--out", str(blend)] if test else []), "--out-oof", str(blend_oof),
                "--n-trials", str(cfg.blend.n_trials), "--seed", str(cfg.blend.seed), "--no-progress"]
        argv += ["--tune-decoding", cfg.tune.strategy] if cfg.tune.enabled else []
        outs = [blend_oof, *([blend] if test else [])]
        steps.append(Step("blend", argv, blend_oof, lambda: all(_probs_done(p)() for p in outs),
                          lambda: _blend_figure(blend_oof),
                          needs=(*llm_steps, *predict_steps, *(("tfidf",) if cfg.tfidf.enabled else ()))))
        probs, oof, probs_from, oof_from = (blend if test else None), blend_oof, ("blend",), ("blend",)

    thresholds, tuned = None, ()
    if cfg.tune.enabled:
        thresholds, tuned = out / "thresholds.json", ("tune",)
        argv = ["-m", "infer", "tune", "--oof", str(oof), "--labels", labels, "--folds", str(folds_csv),
                "--strategy", cfg.tune.strategy, "--n-trials", str(cfg.tune.n_trials), "--seed", str(cfg.tune.seed),
                "--out", str(thresholds), "--no-progress"]
        steps.append(Step("tune", argv, thresholds, thresholds.is_file, lambda: _tune_figure(thresholds),
                          needs=oof_from))

    if test and cfg.submit.enabled:
        sub = out / "submission.csv"
        argv = ["-m", "infer", "submit", "--probs", str(probs),
                *(["--thresholds", str(thresholds)] if thresholds else []), "--ids", test, "--out", str(sub)]
        steps.append(Step("submit", argv, sub, sub.is_file, lambda: _submission_figure(sub),
                          needs=(*probs_from, *tuned)))
    return steps


def cv_members(cfg: PipelineConfig, config: str | None, user: list[str], run_cfg: RunConfig
               ) -> list[tuple[str, list[str]]]:
    """The CVs the pipeline trains, each a model of the blend: (folder, its overrides on top of the pipeline's) for
    ``cv`` (the first seed), ``cv-seed<N>`` (the other seeds) and ``cv-<name>`` (``cv.variants``, on top of the
    first's). All on the first one's folds: a seed or variant other than the config's pins ``cv.seed``. A variant whose
    overrides do not load is an error naming it, before anything runs."""
    if cfg.runs:
        return []
    pin = [f"cv.seed={run_cfg.split_seed}"] if run_cfg.cv.seed is None else []

    def seed_sets(seed: int | None) -> list[str]:  # the config's own seed needs no override
        return [] if seed is None or seed == run_cfg.train.seed else [f"train.seed={seed}", *pin]

    seeds = cfg.cv.seeds or [None]
    first = seed_sets(seeds[0])
    members = [("cv", first), *((f"cv-seed{s}", seed_sets(s)) for s in seeds[1:])]
    for name, sets in cfg.cv.variants.items():
        variant = [*first, *(p for p in pin if p not in first), *sets]
        try:
            RunConfig.from_yaml(config, user + variant)
        except ConfigError as e:
            raise ConfigError(f"cv.variants.{name}: {e}") from None
        members.append((f"cv-{name}", variant))
    return members


def _dapt_corpus(cfg: PipelineConfig) -> list[str]:
    return list(cfg.dapt.corpus) or ([cfg.test_csv] if cfg.test_csv else [])


def _cv_done(run: Path, folds: list[int], final: bool) -> Callable[[], bool]:
    def done() -> bool:
        summary = run / "summary.json"  # written after every fold (and the final model) finished
        if not summary.is_file() or sorted(_read_json(summary)["folds"]) != sorted(folds):
            return False
        return not final or final_adapter(run) is not None

    return done


def _trim_figure(report: Path) -> str:
    r = _read_json(report)
    p = r["parameters"]
    return f"kept {r['kept_rows']:,} of {r['original_rows']:,} tokens, parameters {p['before']:,} -> {p['after']:,}"


def _dapt_figure(info: Path) -> str:
    d = _read_json(info)
    if d.get("eval_loss_end") is not None:
        return f"{d['steps']} steps, held-out loss {d['eval_loss_start']:.4f} -> {d['eval_loss_end']:.4f}"
    return f"{d['steps']} steps, loss {d['first_loss']:.4f} -> {d['mean_loss_last_10pct']:.4f}"


def _predict_figure(probs: Path) -> str:
    m = _read_json(meta_path(probs))
    return f"{m['rows']} rows predicted" + (f", {m['rows_per_s']:.1f} rows/s" if m.get("rows_per_s") else "")


def _tfidf_figure(tfidf: Path) -> str:
    s = _read_json(tfidf / "summary.json")
    return f"exact match {s['oof_metrics']['cascade/exact_match']:.4f} cascade (OOF, {s['rows']} rows)"


# ---------------------------------------------------------------------------------------------------- running it


@dataclass
class Action:
    """What :func:`decide` makes of one step."""

    step: Step
    do: Literal["skip", "run", "resume", "rerun", "replace"]
    why: str = ""


@dataclass
class StepResult:
    name: str
    status: Literal["ran", "skipped", "failed", "not run"]
    seconds: float | None
    figure: str
    log: Path | None = None


def read_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        return {"steps": {}}
    try:
        state = _read_json(path)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); delete it to rebuild what the pipeline knows") from None
    return state if isinstance(state.get("steps"), dict) else {"steps": {}}


def decide(steps: list[Step], state: dict) -> list[Action]:
    """Skip, run, resume or redo each step (see the module doc); a stale output that must not be thrown away stops
    everything before any step runs: InputError naming each such folder."""
    records, redone, actions, refused = state["steps"], set(), [], []
    for step in steps:
        rec = records.get(step.name)
        changed_inputs = [n for n in step.needs if n in redone or rec is not None and
                          rec.get("inputs", {}).get(n) != records.get(n, {}).get("finished")]
        changed_command = rec is None or rec.get("command") != step.argv
        if step.complete():
            if not changed_inputs and not changed_command:
                actions.append(Action(step, "skip"))
                continue
            why = (f"made before {', '.join(changed_inputs)} was redone" if changed_inputs else
                   "made by another command" if rec is not None else "made outside this pipeline")
            if step.redo == "refuse" or (step.redo == "resume" and changed_inputs):
                msg = f"step {step.name}: {step.output} is complete but was {why}"
                if rec is not None and changed_command:
                    msg += f"\n    was: {display_command(rec['command'])}\n    now: {display_command(step.argv)}"
                refused.append(f"{msg}\n  delete {step.output} to redo it (or choose another --out)")
            else:
                actions.append(Action(step, step.redo, why))
        elif step.resumable and step.output.is_dir() and any(step.output.iterdir()):
            actions.append(Action(step, "resume", "half done"))
        else:
            actions.append(Action(step, "run"))
        redone.add(step.name)
    if refused:
        raise InputError("the pipeline would throw away finished work:\n  " + "\n  ".join(refused))
    return actions


def display_command(argv: list[str]) -> str:
    return "python " + shlex.join(argv)


def _figure(step: Step) -> str:
    try:
        return step.figure()
    except (OSError, KeyError, ValueError, TypeError) as e:  # a figure is a report: never stop the pipeline for it
        return f"(no figure: {type(e).__name__}: {e})"


def run_logged(cmd: list[str], log: Path, echo: Callable[[str], None] | None = None) -> int:
    """Run ``cmd``, its stdout and stderr appended to ``log`` and handed to ``echo`` as they come; its exit status."""
    import codecs

    log.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with log.open("ab") as f:
        f.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} $ {shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while chunk := proc.stdout.read1(1 << 16):
                f.write(chunk)
                f.flush()
                if echo is not None:
                    echo(decoder.decode(chunk))
        except BaseException:  # Ctrl-C or a failing echo: never leave the step running behind us
            proc.terminate()
            proc.wait()
            raise
        return proc.wait()


def run_pipeline(cfg: PipelineConfig, out: str | Path, echo: Callable[[str], None] | None = None,
                 launcher: Callable[[Step], list[str]] | None = None, dry_run: bool = False
                 ) -> tuple[list[Action], list[StepResult]]:
    """Plan, decide and run the steps of ``cfg`` into ``out``; returns the actions and one result per step (the run
    stops at the first failed step: the later ones are ``not run``). ``launcher`` turns a step into the process to
    start (default: this interpreter with the step's command; tests inject a kill). ``dry_run``: decide only."""
    out = Path(out)
    check_out_dir(out, "--out")
    actions = decide(plan(cfg, out), read_state(out))
    if dry_run:
        return actions, []
    launcher = launcher or (lambda step: [sys.executable, *step.argv])
    state = read_state(out)
    write_text(out / CONFIG_FILE, cfg.to_yaml())
    results: list[StepResult] = []
    for i, action in enumerate(actions, 1):
        step = action.step
        if results and results[-1].status in ("failed", "not run"):
            results.append(StepResult(step.name, "not run", None, ""))
            continue
        if action.do == "skip":
            results.append(StepResult(step.name, "skipped", None, _figure(step)))
            logger.info(f"[{i}/{len(actions)}] {step.name}: done, skipped ({results[-1].figure})")
            continue
        if action.do == "replace":
            shutil.rmtree(step.output) if step.output.is_dir() else step.output.unlink()
        extra = ["--resume"] if action.do == "resume" else []
        log = out / "logs" / f"{step.name.replace(' ', '-')}.log"
        logger.info(f"[{i}/{len(actions)}] {step.name}" + (f" ({action.do}: {action.why})" if action.why else "")
                    + f": {display_command(step.argv + extra)}")
        t0 = time.time()
        rc = run_logged(launcher(step) + extra, log, echo)
        seconds = time.time() - t0
        if rc == 0 and not step.complete():
            rc = -1  # the command said it finished, its output says otherwise
        if rc != 0:
            why = "its output is incomplete" if rc == -1 else f"exit status {rc}"
            results.append(StepResult(step.name, "failed", seconds, why, log))
            continue
        records = state["steps"]
        records[step.name] = {"command": step.argv, "finished": datetime.now().isoformat(),
                              "seconds": round(seconds, 1),
                              "inputs": {n: records.get(n, {}).get("finished") for n in step.needs}}
        results.append(StepResult(step.name, "ran", seconds, _figure(step), log))
        records[step.name]["figure"] = results[-1].figure
        write_json(out / STATE_FILE, {**state, "versions": versions()})
    state["last"] = [{**dataclasses.asdict(r), "log": str(r.log) if r.log else None} for r in results]
    write_json(out / STATE_FILE, {**state, "versions": versions()})
    return actions, results


def failure(results: list[StepResult]) -> StepResult | None:
    return next((r for r in results if r.status == "failed"), None)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def format_table(results: list[StepResult]) -> str:
    """One line per step: name, status, this invocation's time, figure."""
    rows = [("step", "status", "time", "figure")] + [
        (r.name, r.status, format_seconds(r.seconds), r.figure + (f" (log: {r.log})" if r.status == "failed" else ""))
        for r in results]
    widths = [max(len(row[j]) for row in rows) for j in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in rows)
