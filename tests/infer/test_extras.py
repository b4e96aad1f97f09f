"""The install's extras (pyproject.toml): the base install trains, predicts, tunes, evaluates and submits without
any extra's package; a command whose extra is missing exits 2 naming it. Each check runs in a subprocess where the
extras' packages cannot be imported (``sys.modules[name] = None`` makes ``import name`` raise ImportError), as
after ``pip install -e .``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# What each extra adds, as imported (the distribution names are in pyproject.toml).
EXTRA_MODULES = {
    "serve": ("fastapi", "uvicorn", "pydantic", "prometheus_client", "starlette"),
    "ui": ("streamlit", "pyarrow", "altair"),
    "track": ("tensorboard",),
}
# The library modules that only an extra's command imports.
EXTRA_ONLY = ("infer.serve.app", "infer.serve.schema", "infer.serve.batcher", "infer.serve.http",
              "infer.serve.metrics", "infer.ui_app")


def run_without(modules, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (repo root) in which ``modules`` cannot be imported."""
    block = f"import sys\nfor _m in {tuple(modules)!r}:\n    sys.modules[_m] = None\n"
    return subprocess.run([sys.executable, "-c", block + code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)


def test_pyproject_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for name in ("fastapi", "uvicorn", "pydantic", "prometheus", "streamlit", "tensorboard"):
        assert name not in base, f"{name} is in the base install"
    extras = project["optional-dependencies"]
    assert {"serve", "ui", "track", "embedded", "test"} <= set(extras)
    serve = " ".join(extras["serve"])
    assert all(n in serve for n in ("fastapi", "uvicorn", "pydantic", "prometheus-client"))
    assert "streamlit" in " ".join(extras["ui"]) and "tensorboard" in " ".join(extras["track"])
    # The README's test command (= .ci/run) installs [test,embedded]: test must pull every command's extra.
    assert "qlora-multilabel[serve,ui,track]" in extras["test"]
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[test,embedded]"' in ci and 'pip install -e ".[test,embedded]"' in readme


@pytest.mark.parametrize("argv, extra", [
    (["serve", "--adapter", "nonexistent-adapter"], "serve"),
    (["ui", "--adapter", "nonexistent-adapter"], "ui"),
])
def test_command_without_its_extra_exits_2_naming_it(argv, extra):
    r = run_without(EXTRA_MODULES[extra], f"from infer.__main__ import main\nsys.exit(main({argv!r}))")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith(f"error: python -m infer {argv[0]} needs the '{extra}' extra"), err
    assert f"pip install -e '.[{extra}]'" in err and f"pip install 'qlora-multilabel[{extra}]'" in err
    assert "Traceback" not in r.stderr


def test_base_install_imports_every_base_module_without_the_extras():
    """Every module of core, train and infer but the extras' own imports (and both command lines, every
    subcommand's --help) with no extra's package importable."""
    blocked = [m for mods in EXTRA_MODULES.values() for m in mods]
    code = f"""
import contextlib, importlib, io, pkgutil
import core, infer, train
skip = {EXTRA_ONLY!r}
for pkg in (core, train, infer):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name not in skip and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
from infer.__main__ import build_parser as infer_parser
from train.__main__ import main as train_main
commands = [c for a in infer_parser()._subparsers._group_actions for c in a.choices]
assert {{"predict", "tune", "submit", "evaluate", "serve", "ui"}} <= set(commands), commands
from infer.__main__ import main as infer_main
for c in commands:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        infer_main([c, "--help"])
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    train_main(["--help"])
print("ok", len(commands))
"""
    r = run_without(blocked, code)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("tracker, command, says", [
    ("tensorboard", [], ("train.report_to: [tensorboard] needs the 'track' extra (tensorboard is not installed): "
                         "pip install 'qlora-multilabel[track]'")),
    ("tensorboard", ["dapt", "--corpus", "data/sample_test.csv"], "needs the 'track' extra"),
    ("wandb", [], "train.report_to: [wandb] needs the wandb package, which is not installed: pip install wandb"),
    ("mlflow", [], "pip install mlflow"),
])
def test_a_tracker_without_its_package_exits_2_before_any_model_loads(tmp_path, tracker, command, says):
    """The model path does not exist: the tracker's package is checked first, and nothing is written."""
    out = tmp_path / "run"
    argv = [*command, "--set", f"model.name_or_path={tmp_path / 'no-model'}", "--set", f"output_dir={out}",
            "--set", f"train.report_to=[{tracker}]"]
    r = run_without(EXTRA_MODULES.get("track") if tracker == "tensorboard" else (tracker,),
                    f"from train.__main__ import main\nsys.exit(main({argv!r}))")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error: ") and says in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
