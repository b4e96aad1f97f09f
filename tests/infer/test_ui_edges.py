"""``infer ui`` on a non-loopback address warns like ``serve`` (issue 34), and sends ``$QLML_API_KEY`` to a keyed
``--api`` server."""

from __future__ import annotations

import argparse

import httpx
import pytest
from test_serve import ROW, served, wait_ready

from infer import ui
from infer.commands import ui as ui_command
from infer.serve.app import serve_in_thread
from infer.serve.settings import Settings


class Started(Exception):
    pass


@pytest.mark.parametrize("host, warns", [("0.0.0.0", True), ("192.168.1.5", True), ("127.0.0.1", False)])
def test_ui_warns_on_a_non_loopback_host(monkeypatch, capsys, host, warns):
    monkeypatch.setattr(ui_command, "collect", lambda specs: [object()])
    monkeypatch.setattr(ui_command, "load_spec", lambda ref, thresholds: None)
    monkeypatch.setattr(ui_command, "parse_app_args", lambda argv: None)

    def execv(*a):
        raise Started

    monkeypatch.setattr(ui_command.os, "execv", execv)
    parser = argparse.ArgumentParser()
    ui_command.register(parser.add_subparsers())
    args = parser.parse_args(["ui", "--adapter", "A", "--host", host])
    with pytest.raises(Started):
        ui_command.run(args)
    err = capsys.readouterr().err
    assert ("warning: the UI on" in err and "--api-key-env" in err) == warns


def test_ui_api_client_sends_the_key(monkeypatch):
    monkeypatch.setenv("QLML_API_KEY", "k3y")
    app, _ = served(Settings(api_key_env="QLML_API_KEY"))
    with serve_in_thread(app) as url:
        wait_ready(url, headers={"Authorization": "Bearer k3y"})
        assert len(ui.api_predict(url, [ROW])) == 1
        monkeypatch.delenv("QLML_API_KEY")
        with pytest.raises(Exception, match="401"):
            ui.api_predict(url, [ROW])
        assert httpx.get(f"{url}/health").status_code == 200
