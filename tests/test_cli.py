"""The command line answers help, lists models, and turns errors into one line."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from wsiseg.cli import main


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("segment", "train", "evaluate", "info", "models"):
        assert command in result.output


def test_models_lists_registry() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert "deeplabv3, fcn, segnet, unet" in result.output
    assert "mobilenet_v3_large" in result.output


def test_console_script_help_does_not_import_torch() -> None:
    code = "import sys; from wsiseg.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
