"""The config schema: unknown keys, types, ranges, overrides, cross-field rules, shipped configs."""

from pathlib import Path

import pytest
import yaml

from vlm_tune.config import Config, ConfigError, build_config, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def problems_of(raw, overrides=()):
    with pytest.raises(ConfigError) as info:
        build_config(raw, overrides)
    return info.value.problems, str(info.value)


def test_defaults_validate():
    cfg = build_config({})
    assert isinstance(cfg, Config)
    assert cfg.lora.r == 8 and cfg.train.method == "lora"


def test_unknown_key_named_with_suggestion():
    problems, _ = problems_of({"lora": {"rr": 16}})
    assert problems == ["lora.rr: unknown key (did you mean lora.r?)"]


def test_unknown_section_named():
    problems, _ = problems_of({"trian": {"max_steps": 3}})
    assert problems[0].startswith("trian: unknown key (did you mean train?)")


def test_wrong_type_names_key_value_and_expectation():
    problems, _ = problems_of({"train": {"learning_rate": "fast"}})
    assert len(problems) == 1
    assert problems[0].startswith("train.learning_rate: got 'fast'")
    assert "number" in problems[0]


def test_out_of_range():
    problems, _ = problems_of({"train": {"batch_size": 0}})
    assert problems[0].startswith("train.batch_size: got 0")
    assert "greater than or equal to 1" in problems[0]


def test_bad_literal_lists_choices():
    problems, _ = problems_of({"train": {"method": "qlore"}})
    assert "train.method" in problems[0] and "'qlora'" in problems[0]


def test_all_problems_reported_together():
    problems, message = problems_of({"lora": {"rr": 1, "alpha": -1}, "train": {"max_steps": "x"}, "bogus": 1})
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["bogus", "lora.alpha", "lora.rr", "train.max_steps"]
    assert message.startswith("4 problem(s)")


def test_cross_field_problems_gathered():
    problems, _ = problems_of(
        {
            "prompt": {"user_template": "no placeholder"},
            "hub": {"push_on_end": True},
            "lora": {"targets": ["decodr"]},
        }
    )
    assert len(problems) == 3
    assert any(p.startswith("prompt.user_template") for p in problems)
    assert any(p.startswith("hub.push_on_end") for p in problems)
    assert any("decodr" in p for p in problems)


def test_overrides_parse_yaml_scalars():
    parsed = dict(
        (".".join(k), v)
        for k, v in parse_overrides(
            [
                "train.learning_rate=1e-4",
                "lora.r=16",
                "model.train_vision=true",
                "prompt.system=null",
                "lora.targets=[decoder]",
                "run.name=abc",
            ]
        )
    )
    assert parsed == {
        "train.learning_rate": 1e-4,
        "lora.r": 16,
        "model.train_vision": True,
        "prompt.system": None,
        "lora.targets": ["decoder"],
        "run.name": "abc",
    }


def test_overrides_applied_and_validated():
    cfg = build_config({"lora": {"r": 4}}, ["lora.r=16", "train.learning_rate=1e-4"])
    assert cfg.lora.r == 16 and cfg.train.learning_rate == pytest.approx(1e-4)
    problems, _ = problems_of({}, ["lora.rr=16"])
    assert problems == ["lora.rr: unknown key (did you mean lora.r?)"]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        build_config({}, ["lora.r"])


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n")
    assert load_config(path).train.learning_rate == pytest.approx(1e-4)


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config({}, ["lora.r=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.run.output_dir
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each config starts with a comment"
    assert "vlm-tune " in path.read_text().split("\n\n")[0] or "vlm-tune" in path.read_text()[:600]


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "quickstart.yaml" in names


def test_missing_file_and_bad_yaml(tmp_path):
    from vlm_tune.errors import UserError

    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    assert yaml.safe_load("a: 1") == {"a": 1}


ACCELERATE = sorted((Path(__file__).parent.parent / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_configs_load_and_name_their_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2
    assert "-m vlm_tune.cli train configs/" in path.read_text().split("\n\n")[0]


def test_accelerate_configs_cover_fsdp_and_deepspeed():
    assert {p.stem.split("-")[0] for p in ACCELERATE} >= {"fsdp", "deepspeed"}
