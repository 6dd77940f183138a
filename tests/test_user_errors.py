"""Errors a user can act on (prompt templates, predict inputs, uncached bases) and portable saved adapters."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from vlm_tune.cli import main
from vlm_tune.config import ConfigError, build_config
from vlm_tune.data.chat import build_messages

# ---------------------------------------------------------------------------------------------------------
# part 5: prompt templates


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{question} {oops}", r"unknown placeholder\(s\) \{oops\}"),
        ('Reply as JSON {"answer": ...} {question}', r"unknown placeholder\(s\) \{\"answer\": ...\}"),
        ("{question} }", r"unpaired brace"),
        ("{question} {", r"unpaired brace"),
        ("{} {question}", r"unknown placeholder\(s\) \{\}"),
        ("{question:>9}", r"unknown placeholder\(s\) \{question:>9\}"),
        ("{{question}}", r"must contain \{question\}"),
    ],
)
def test_bad_user_templates_are_config_errors(template, expected):
    with pytest.raises(ConfigError, match=r"prompt\.user_template: " + expected):
        build_config({"prompt": {"user_template": template}})


def test_escaped_braces_are_literal_in_the_prompt():
    template = 'Reply as JSON {{"answer": ...}}\n{question}'
    cfg = build_config({"prompt": {"user_template": template}})
    row = {"images": [], "question": "Which year?", "answers": ["2014"]}
    text = build_messages(row, None, cfg.prompt.user_template)[0]["content"][-1]["text"]
    assert text == 'Reply as JSON {"answer": ...}\nWhich year?'


def test_bad_template_through_the_cli_exits_2_without_traceback(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prompt:\n  user_template: '{question} {oops}'\n")
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "prompt.user_template" in err and "{oops}" in err and "KeyError" not in err


# ---------------------------------------------------------------------------------------------------------
# part 6: a saved adapter, made the way train saves it (untrained LoRA: enough to test the files)


@pytest.fixture(scope="module")
def adapter(cache_dir, tmp_path_factory):
    """RUN/final written by save_final with a relative model.cache_dir, as `train` from a project folder does."""
    from vlm_tune.model import load_model, load_processor, resolve_model_path, setup_training
    from vlm_tune.train import save_final

    work = tmp_path_factory.mktemp("project")
    (work / ".cache").mkdir()
    shutil.copytree(cache_dir / "tiny-model", work / ".cache" / "tiny-model")
    cfg = build_config({"model": {"cache_dir": ".cache", "image": {"longest_edge": 64}}, "lora": {"r": 2}})
    old = os.getcwd()
    os.chdir(work)
    try:
        path = resolve_model_path(cfg)
        assert path == ".cache/tiny-model"  # relative, as the user wrote it
        model = setup_training(load_model(path, cfg), cfg)
        save_final(model, load_processor(path, cfg), cfg, work / "run" / "final")
    finally:
        os.chdir(old)
    return work / "run" / "final"


def test_adapter_base_path_is_absolute_and_loads_from_another_directory(adapter, tmp_path, monkeypatch):
    from vlm_tune.inference import load_for_inference

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.isdir(base)
    monkeypatch.chdir(tmp_path)  # a directory without .cache/
    model, processor, prompt = load_for_inference(adapter)
    assert prompt["user_template"] and model.peft_config["default"].base_model_name_or_path == base


def test_saved_processor_files_carry_no_loading_flags(adapter, tmp_path):
    for name in ("tokenizer_config.json", "processor_config.json"):
        text = (adapter / name).read_text()
        assert "local_files_only" not in text and "is_local" not in text, name
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(adapter).tokenizer.eos_token == "<end_of_utterance>"


def test_merged_model_files_carry_no_loading_flags(adapter, tmp_path):
    from vlm_tune.inference import merge

    out = merge(adapter, tmp_path / "merged")
    assert "local_files_only" not in (out / "tokenizer_config.json").read_text()


def with_base(adapter, tmp_path, base):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("command", ["predict", "eval", "merge"])
def test_uncached_hub_base_offline_names_it_for_every_command(
    adapter, tmp_path, monkeypatch, capsys, command
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = with_base(adapter, tmp_path, "nobody-xyz/no-such-base")
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    argv = {
        "predict": [
            "predict",
            "--adapter",
            str(copy),
            "--image",
            str(tmp_path / "a.png"),
            "--question",
            "Q?",
        ],
        "eval": ["eval", str(copy / "config.yaml"), "--adapter", str(copy)],
        "merge": ["merge", str(copy), str(tmp_path / "merged")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'nobody-xyz/no-such-base' is not in the local cache and HF_HUB_OFFLINE=1" in err
    assert "Traceback" not in err and "OSError" not in err


def test_missing_local_base_names_the_fix(adapter, tmp_path, capsys):
    copy = with_base(adapter, tmp_path, str(tmp_path / "gone"))
    assert main(["merge", str(copy), str(tmp_path / "m")]) == 2
    assert "set base_model_name_or_path in its adapter_config.json" in capsys.readouterr().err


def test_predict_names_the_image_file_that_cannot_be_decoded(adapter, tmp_path, capsys):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    (tmp_path / "chart.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    argv = ["predict", "--adapter", str(adapter), "--image", str(tmp_path / "full.png")]
    assert main([*argv, "--image", str(tmp_path / "chart.png"), "--question", "Q?"]) == 2
    err = capsys.readouterr().err
    assert f"--image {tmp_path / 'chart.png'}: image file {tmp_path / 'chart.png'} cannot be decoded" in err


# ---------------------------------------------------------------------------------------------------------
# part 6: no bitsandbytes notice unless 4-bit is used


NOTICE_PROBE = """
import logging, sys
import vlm_tune.quiet as quiet  # what `import vlm_tune` installs
seen = []
class Seen(logging.Filter):
    def filter(self, record):
        seen.append(record.getMessage())
        return True
for name in (quiet.BNB_CPU_LOGGER, quiet.KERNELS_HUB_LOGGER):
    logging.getLogger(name).filters.insert(0, Seen())  # sees the notices before quiet's filter
import peft.tuners.lora, bitsandbytes  # what every LoRA command imports
print(sum(any(mark in m for mark in quiet.NOTICE_MARKS) for m in seen))
"""


def test_bitsandbytes_kernel_notice_hidden_without_4bit():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", NOTICE_PROBE], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "0":
        pytest.skip("bitsandbytes logs no kernels notice on this CPU (no AVX512-BF16)")
    assert "gemm_4bit_forward" not in proc.stderr and "kernels" not in proc.stderr


@pytest.mark.parametrize(
    "logger_name, notice",
    [
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: x."),
        (
            "kernels._internals.hf_hub",
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging "
            "Face Hub is in offline mode.",
        ),
    ],
)
def test_bitsandbytes_kernel_notice_passes_once_4bit_is_used(monkeypatch, caplog, logger_name, notice):
    import logging

    from vlm_tune import quiet

    quiet.install()
    monkeypatch.setitem(
        quiet._state, "four_bit", False
    )  # an earlier test in this process may have loaded 4-bit
    logger = logging.getLogger(logger_name)
    with caplog.at_level(logging.WARNING, logger=logger_name):
        logger.warning(notice)
        assert notice not in caplog.text
        monkeypatch.setitem(quiet._state, "four_bit", True)
        logger.warning(notice)
        assert notice in caplog.text
        logger.warning("another library warning")
        assert "another library warning" in caplog.text
