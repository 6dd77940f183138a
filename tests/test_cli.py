"""The command line: help for every command, user mistakes exit 2 with a message and no traceback."""

import subprocess
import sys

import pytest

from vlm_tune.cli import build_parser, main

COMMANDS = ["train", "eval", "check", "predict", "push", "merge", "synth", "tiny-model", "config", "env"]


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "vlm_tune.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: vlm-tune " + command in capsys.readouterr().out


def test_config_typo_exits_2_with_key_named_and_no_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  rr: 16\ntrain:\n  learning_rate: fast\n")
    result = run_cli("train", str(cfg))
    assert result.returncode == 2
    assert "lora.rr: unknown key (did you mean lora.r?)" in result.stderr
    assert "train.learning_rate: got 'fast'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing written"


def test_bad_override_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  name: x\n")
    result = run_cli("config", str(cfg), "train.batch_size=0")
    assert result.returncode == 2 and "train.batch_size: got 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_overrides_may_follow_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  name: x\n")
    assert main(["config", str(cfg), "lora.r=32", "run.name=y"]) == 0
    out = capsys.readouterr().out
    assert "r: 32" in out and "name: y" in out
    args = build_parser().parse_args(["train", str(cfg), "--resume"])
    assert args.resume == "latest"


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "train", str(tmp_path / "missing.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli("check", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_resume_without_run_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run:\n  output_dir: {tmp_path / 'nowhere'}\n")
    result = run_cli("train", str(cfg), "--resume")
    assert result.returncode == 2 and "start the run without --resume" in result.stderr


def test_schema_printed(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate = 0.0002" in out and "lora.r = 8" in out
