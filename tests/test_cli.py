"""The command line (dpo_ray.cli): one module, subcommands, the workflows as thin callers of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ray import cli

REPO = Path(__file__).resolve().parent.parent


def test_every_workflow_script_calls_the_cli_function_of_its_command():
    for command, function in cli.COMMANDS.items():
        script = REPO / "workflows" / f"{command.replace('-', '_')}.py"
        text = script.read_text()
        assert f"from dpo_ray.cli import {function.__name__}" in text, script
        assert text.startswith("#!/usr/bin/env python"), script


def test_main_dispatches_subcommands_and_trains_without_one(monkeypatch):
    calls = []
    monkeypatch.setitem(cli.COMMANDS, "train", lambda argv: calls.append(("train", argv)))
    monkeypatch.setitem(cli.COMMANDS, "sweep", lambda argv: calls.append(("sweep", argv)))
    cli.main(["sweep", "--config", "configs/sweep.yaml"])
    cli.main(["--set", "dpo.beta=0.2"])
    cli.main([])
    assert calls == [("sweep", ["--config", "configs/sweep.yaml"]), ("train", ["--set", "dpo.beta=0.2"]),
                     ("train", [])]


def test_an_unknown_command_or_bad_key_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2 and "'trian'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--set", "dpo.bta=0.1"])
    assert exit_info.value.code == 2 and "'dpo.bta'" in capsys.readouterr().err


def test_python_dash_m_dpo_ray_cli_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "dpo_ray.cli", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(command in proc.stdout for command in cli.COMMANDS)
