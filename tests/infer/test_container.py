"""The service image's Containerfile, checked by parsing it (hadolint is not in Debian; the image itself is built and
smoke-tested by tools/container_smoke.sh, not in CI): known instructions, the documented shape (BASE argument, CPU
torch wheel, [serve,ui,embedded], non-root user, serve entrypoint with a /health HEALTHCHECK, /adapters volume), an
entrypoint + default command that ``python -m infer`` accepts, and a .dockerignore keeping runs out."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped, as a Dockerfile parser does."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comments inside a continued instruction are skipped too
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword, args.strip()))
    assert not pending, "the file ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(REPO / "Containerfile")


def args_of(steps, keyword) -> list[str]:
    return [a for k, a in steps if k == keyword]


def test_containerfile_parses(steps):
    unknown = [k for k, _ in steps if k.upper() not in INSTRUCTIONS or k != k.upper()]
    assert not unknown, unknown
    assert steps[0] == ("ARG", "BASE=python:3.12-slim") and steps[1] == ("FROM", "${BASE}")
    assert len(args_of(steps, "FROM")) == 1
    for keyword in ("ENTRYPOINT", "CMD", "VOLUME"):  # exec / JSON forms must be valid JSON
        for a in args_of(steps, keyword):
            assert isinstance(json.loads(a), list), (keyword, a)
    arg_defaults = dict(a.split("=", 1) if "=" in a else (a, "") for a in args_of(steps, "ARG"))
    used = {name for _, a in steps[2:] for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", a)}
    assert {"TORCH", "TORCH_INDEX", "EXTRAS", "PIP_CA", "WHEELS"} <= used
    assert used <= set(arg_defaults) | {"PATH", "PIP_CERT"}, used - set(arg_defaults)


def test_containerfile_shape(steps):
    args = dict(a.split("=", 1) for a in args_of(steps, "ARG") if "=" in a)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu" and args["TORCH"].startswith("torch==")
    assert args["EXTRAS"] == "serve,ui,embedded"
    assert args["PIP_CA"] == "" and args["WHEELS"] == ""  # the build-here switches are off for users
    runs = " ".join(args_of(steps, "RUN"))
    assert '"$TORCH"' in runs and '"/src[$EXTRAS]"' in runs
    user = args_of(steps, "USER")
    assert user and user[-1] not in ("root", "0"), user
    assert "/adapters" in json.loads(args_of(steps, "VOLUME")[-1])
    (health,) = args_of(steps, "HEALTHCHECK")
    assert "CMD" in health and "/health" in health
    entry = json.loads(args_of(steps, "ENTRYPOINT")[-1])
    assert entry == ["python", "-m", "infer", "serve", "--host", "0.0.0.0"]
    text = (REPO / "Containerfile").read_text()
    assert "--api-key-env" in text and "-m infer ui" in text and "cu1" in text  # documented alternatives
    for source in (a.split()[0] for a in args_of(steps, "COPY")):
        assert (REPO / source).exists(), source


def test_entrypoint_and_command_parse(steps):
    """The image's default command line (ENTRYPOINT + CMD) is one that ``python -m infer`` accepts."""
    from infer.__main__ import build_parser

    argv = json.loads(args_of(steps, "ENTRYPOINT")[-1])[3:] + json.loads(args_of(steps, "CMD")[-1])
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000
    assert args.adapter == ["/adapters/gemma-3-270m"]
    (health,) = args_of(steps, "HEALTHCHECK")
    assert f"127.0.0.1:{args.port}/health" in health
    assert str(args.port) in " ".join(args_of(steps, "EXPOSE")).split()


def test_dockerignore_keeps_local_state_out(steps):
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for path in (".venv", "runs", "adapters", ".git"):
        assert any(fnmatch.fnmatch(path, p) for p in patterns), path
    for source in (a.split()[0] for a in args_of(steps, "COPY")):  # nothing the build copies is ignored
        assert not any(fnmatch.fnmatch(source, p) for p in patterns), source


def test_smoke_script_is_valid_bash():
    script = REPO / "tools" / "container_smoke.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "buildah bud --isolation chroot" in text and '$(podman image mount "$IMAGE")' in text
