"""The `pyrag` dispatcher: every command in its table resolves and prints its own help; unknown commands, bare
calls and --version behave as a command line should. (Each command's behaviour is tested beside its code.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

import pyrag
from pyrag.cli import COMMANDS, main


def _help(name: str, capsys) -> str:
    """`pyrag <name> --help`: exit code 0 (argparse exits after printing; a command may also catch that and
    return 0), and the printed text."""
    try:
        code = main([name, "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_prints_its_help(name, capsys):
    out = _help(name, capsys)
    assert out.startswith(f"usage: pyrag {name}"), out[:200]
    assert "(default: " in out  # options show their defaults, with or without a help text


def test_help_shows_defaults_even_without_help_text(capsys):
    out = " ".join(_help("train", capsys).split())  # argparse wraps lines
    for option, default in (("--steps STEPS", "1000"), ("--eval-every EVAL_EVERY", "0"),
                            ("--mode {token,sequence}", "token"), ("--lr-generator LR_GENERATOR", "3e-05")):
        assert f"{option} (default: {default})" in out, option
    assert "--no-bf16 no bf16 autocast on GPU --device" in out  # flags (default False) get no "(default: False)"


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS), out
    assert main(["--help"]) == 0 and capsys.readouterr().out == out


def test_unknown_command_exits_2_with_usage(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "usage: pyrag <command>" in err


def test_version_and_module_entry_point(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pyrag {pyrag.__version__}"
    # `python -m pyrag` (what torchrun runs) reaches the same dispatcher and exit codes
    proc = subprocess.run([sys.executable, "-m", "pyrag", "nosuch"], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 2 and "unknown command 'nosuch'" in proc.stderr
