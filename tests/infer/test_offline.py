"""No network at run time (issue 34): loading a local adapter, ``infer predict`` and ``infer serve``'s start-up and
first answer run in a subprocess where any socket connection or name lookup off the loopback fails and is logged
(tests/infer/offline/sitecustomize.py on PYTHONPATH). bitsandbytes' Hub kernel lookup included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import socket, sys
try:
    socket.getaddrinfo("huggingface.co", 443)
except OSError:
    pass
else:
    raise SystemExit("the network guard is not installed")
from infer.__main__ import main
assert main(["predict", "--adapter", sys.argv[1], "--input", sys.argv[2], "--out", sys.argv[3], "--no-progress"]) == 0
import httpx
from infer.serve.app import create_app, serve_in_thread
from infer.serve.settings import Settings
app = create_app(settings=Settings(adapters=[sys.argv[1]]))
with serve_in_thread(app) as url:
    import time
    t0 = time.time()
    while httpx.get(url + "/ready").status_code != 200:
        assert time.time() - t0 < 120, httpx.get(url + "/ready").text
        time.sleep(0.1)
    r = httpx.post(url + "/predict", json={"rows": [{"assessment": 4, "tags": ["DELIVERY"], "text": "ok"}]})
    assert r.status_code == 200, r.text
print("OFFLINE-OK")
"""


def test_load_predict_and_serve_touch_no_network(tiny_run, tmp_path):
    csv = tmp_path / "rows.csv"
    pd.read_csv(REPO / "data" / "sample_test.csv").head(4).to_csv(csv, index=False)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env.update(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "offline"), str(REPO)]),
               QLML_NET_LOG=str(log))
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_run), str(csv), str(tmp_path / "probs.csv")], check=False,
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "OFFLINE-OK" in r.stdout, out[-4000:]
    attempts = log.read_text().splitlines() if log.is_file() else []
    assert attempts == ["getaddrinfo 'huggingface.co'"], attempts  # only the script's own check of the guard
    assert "kernels-community" not in out and "trust_remote_code" not in out, out[-4000:]
