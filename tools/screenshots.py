"""Screenshots of training's tracking for the docs: the TensorBoard scalars page of a run (``tensorboard --logdir
RUN/logs`` on 127.0.0.1, opened in headless Debian chromium through Playwright, as tests/infer/test_ui.py does) and
the run's ``curves.png``.

Usage (from the project root):
    python tools/screenshots.py docs                 # trains a tiny random-weight run first (CPU, ~2 min)
    python tools/screenshots.py OUT --run RUN        # an existing run trained with train.report_to=[tensorboard]

Writes ``OUT/tensorboard.png`` and ``OUT/curves.png``. The tiny run: benchmarks.shapes' ``tiny-gemma3`` (the 270M's
architecture, 6 layers of width 64, random weights, the real tokenizer), folds 0-1 of 5 on data/sample_train.csv,
3 epochs: its curves show the mechanics, not what the real model learns.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
TAGS = "^train/|^eval/cascade/(exact_match|micro_f1)"


def tiny_run(work: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from benchmarks.shapes import build_shape

    model = build_shape("tiny-gemma3", None, work)
    run = work / "tiny-run"
    sets = {"model.name_or_path": model, "output_dir": run, "cv.folds": "[0,1]", "train.num_epochs": 3,
            "train.lr": "2e-3", "train.head_lr": "5e-3", "train.warmup_ratio": 0.1, "data.max_length": 128,
            "train.report_to": "[tensorboard]"}
    cmd = [sys.executable, "-m", "train", "--config", "configs/gemma-3-270m/qlora.yaml"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_shot(logs: Path, shot: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logs), "--host", "127.0.0.1",
                             "--port", str(port), "--load_fast", "false"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"tensorboard did not start: {proc.stdout.read()}") from None
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1160})  # the six charts of TAGS
            page.goto(f"http://127.0.0.1:{port}/?darkMode=false#scalars", timeout=120_000)
            page.get_by_text("train/loss").first.wait_for(timeout=120_000)
            page.locator("tf-tag-filterer input").fill(TAGS)  # the step scalars and the cascade's metrics
            page.get_by_text("eval/cascade/exact_match").first.wait_for(timeout=120_000)
            time.sleep(8)  # the charts draw their lines after the data arrives
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))  # the page scrolls inside: the viewport is the picture
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for tensorboard.png and curves.png")
    p.add_argument("--run", help="an existing run folder (default: train a tiny one in a temporary folder)")
    args = p.parse_args(argv)
    if not CHROMIUM.is_file():
        raise SystemExit(f"no {CHROMIUM}: apt-get install -y chromium")
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="qlml-shots."))
    try:
        run = Path(args.run) if args.run else tiny_run(work)
        tensorboard_shot(run / "logs", out / "tensorboard.png")
        shutil.copyfile(run / "curves.png", out / "curves.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / 'tensorboard.png'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
