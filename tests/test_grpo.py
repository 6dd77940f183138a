"""The GRPO stage's parts: the rl config, rewards equal to the evaluation metric, the skip_solved filter, the
preflight errors, and the KL reference of a continued SFT adapter."""

import pytest
import torch

from tests.conftest import tiny_cfg
from vlm_tune.cli import main
from vlm_tune.config import ConfigError, build_config, describe_schema
from vlm_tune.errors import UserError
from vlm_tune.evaluate import score
from vlm_tune.rewards import answer_of, build_rewards, format_reward, metric_reward

# -- config ------------------------------------------------------------------------------------------------


def test_rl_defaults_and_schema():
    cfg = build_config({"train": {"stage": "grpo"}})
    assert cfg.rl.beta == 0.0 and cfg.rl.num_generations == 4 and cfg.rl.rewards == {"relaxed_accuracy": 1.0}
    assert cfg.rl.answer_format == "plain" and not cfg.rl.use_vllm and not cfg.rl.skip_solved
    schema = describe_schema()
    for key in ("num_generations", "max_completion_length", "temperature", "beta", "learning_rate", "steps"):
        assert f"rl.{key} = " in schema
    assert "train.stage = 'sft'" in schema and "model.adapter = None" in schema


def test_rl_problems_reported_together_naming_the_keys():
    raw = {
        "rl": {"num_generation": 3, "rewards": {"exact": 1.0}, "answer_format": "xml", "temperature": 0},
    }
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    text = str(err.value)
    assert "rl.num_generation: unknown key (did you mean rl.num_generations?)" in text
    assert "rl.answer_format" in text and "rl.temperature" in text
    with pytest.raises(ConfigError) as err:
        build_config(
            {"rl": {"rewards": {"exact": 1.0, "format": 0.0}, "build_adapter": True, "skip_solved": True}}
        )
    text = str(err.value)
    assert "rl.rewards: unknown reward(s) ['exact']" in text
    assert "rl.build_adapter: true needs model.adapter" in text
    assert "rl.skip_solved: needs a metric reward" in text
    with pytest.raises(ConfigError, match="rl.rewards: give at least one reward a non-zero weight"):
        build_config({"rl": {"rewards": {"exact_match": 0.0, "format": 0.0}}})


def test_tagged_evaluation_gets_the_completion_budget():
    tagged = {"train": {"stage": "grpo"}, "rl": {"answer_format": "tagged", "max_completion_length": 64}}
    with pytest.raises(ConfigError) as err:
        build_config(tagged | {"eval": {"max_new_tokens": 16}})
    assert "eval.max_new_tokens (16) < rl.max_completion_length (64) with rl.answer_format tagged" in str(
        err.value
    )
    assert build_config(tagged | {"eval": {"max_new_tokens": 64}}).eval.max_new_tokens == 64
    plain = {"train": {"stage": "grpo"}, "rl": {"max_completion_length": 64}, "eval": {"max_new_tokens": 16}}
    assert build_config(plain).rl.answer_format == "plain"  # a plain answer is short: no rule


# -- rewards -----------------------------------------------------------------------------------------------

RAWS = [
    "12<end_of_utterance>",
    " 12.0\n",
    "Assistant: 2017<end_of_utterance>junk",
    "12%",
    "Blue",
    "blue<end_of_utterance>",
    "",
    "[10, 12]",
    "1,000",
]
GOLDS = [["12"], ["12"], ["2017"], ["12"], ["blue"], ["Blue", "navy"], ["3"], ["[10, 12]"], ["1000"]]


@pytest.mark.parametrize("metric, field", [("relaxed_accuracy", "relaxed"), ("exact_match", "exact")])
def test_reward_equals_the_evaluation_score_of_the_same_string(metric, field):
    rows = [{"id": str(i), "question": "q", "answers": g} for i, g in enumerate(GOLDS)]
    records = score(rows, RAWS, "vlm-tune", raw=True)
    assert [metric_reward(r, g, metric) for r, g in zip(RAWS, GOLDS, strict=True)] == [
        x[field] for x in records
    ]
    assert 0 < sum(x[field] for x in records) < len(records)  # the strings cover both outcomes


def test_tagged_answers_are_extracted_before_scoring():
    raw = "The bars read 3, 5 and 7; the largest is 7. <answer>7</answer><end_of_utterance>"
    assert answer_of(raw, "tagged") == "7"
    assert metric_reward(raw, ["7"], "exact_match", "tagged") == 1.0
    assert metric_reward(raw, ["7"], "exact_match", "plain") == 0.0  # the reasoning would be scored
    assert metric_reward("7", ["7"], "exact_match", "tagged") == 0.0  # no tags: no answer
    assert answer_of("<answer>3</answer> then <answer>4</answer>", "tagged") == "4"


def test_format_reward():
    assert format_reward("12<end_of_utterance>", 2, True, "plain", 8) == 1.0
    assert format_reward("12", 2, False, "plain", 8) == 0.0  # not closed by the end-of-turn token
    assert format_reward("1 2 3 4 5 6 7 8 9", 9, True, "plain", 8) == 0.0  # too long
    assert format_reward("<end_of_utterance>", 1, True, "plain", 8) == 0.0  # empty
    assert format_reward("think... <answer>7</answer><end_of_utterance>", 12, True, "tagged", 8) == 1.0
    assert format_reward("<answer>7</answer> more<end_of_utterance>", 6, True, "tagged", 8) == 0.0


def test_trl_reward_functions_decode_the_completion_ids_as_evaluation_does(processor):
    tok = processor.tokenizer
    texts = ["12<end_of_utterance>", "13<end_of_utterance>", "12"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    funcs, weights = build_rewards(
        {"exact_match": 1.0, "format": 0.5, "relaxed_accuracy": 0.0}, tok, "<end_of_utterance>", "plain", 8
    )
    assert [f.__name__ for f in funcs] == ["exact_match", "format"] and weights == [1.0, 0.5]
    kwargs = {
        "prompts": [None] * 3,
        "completions": [None] * 3,
        "completion_ids": ids,
        "answers": [["12"]] * 3,
    }
    assert funcs[0](**kwargs, type=["count"] * 3) == [1.0, 0.0, 1.0]
    assert funcs[1](**kwargs) == [1.0, 1.0, 0.0]


# -- skip_solved -------------------------------------------------------------------------------------------


def test_skip_solved_keeps_only_rows_with_mixed_outcomes(tmp_path):
    from vlm_tune.rl_filter import drop_solved, informative

    assert informative([[1, 1], [0, 0], [1, 0], [0.0, 1.0, 1.0]]) == [2, 3]

    class Rows:
        name = "toy"

        def __len__(self):
            return 3

        def row(self, i, images=True):
            return {"id": i, "question": "q", "answers": [str(i)], "images": [], "type": "t", "split": "s"}

    groups = [["0", "0"], ["x", "y"], ["2", "9"]]  # row 0 always solved, row 1 never, row 2 sometimes
    cfg = build_config({"rl": {"skip_solved": True, "rewards": {"exact_match": 1.0}}})
    kept = drop_solved(None, None, None, cfg, Rows(), [0, 1, 2], tmp_path, sample=lambda *a: groups)
    assert kept == [2]
    assert '"all_solved": 1' in (tmp_path / "rl_filter.json").read_text()
    with pytest.raises(UserError, match="rl.skip_solved"):
        drop_solved(None, None, None, cfg, Rows(), [0, 1], tmp_path, sample=lambda *a: groups[:2])


# -- preflight ---------------------------------------------------------------------------------------------


def test_use_vllm_without_vllm_exits_2_naming_the_key(cache_dir, tmp_path, capsys, monkeypatch):
    import vlm_tune.rl

    monkeypatch.setattr(vlm_tune.rl, "vllm_installed", lambda: False)  # as here, where it is not installed
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        tiny_cfg(cache_dir, tmp_path / "run", "train.stage=grpo", "rl.use_vllm=true").to_yaml()
    )
    assert main(["train", str(cfg_path)]) == 2
    assert "rl.use_vllm: true but vLLM is not installed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_prefix_lm_family_is_refused(family_stand_ins):
    from vlm_tune.families import load_processor
    from vlm_tune.rl import rl_preflight

    processor = load_processor(str(family_stand_ins["paligemma"]))
    with pytest.raises(UserError, match="train.stage: grpo is not supported for paligemma"):
        rl_preflight(build_config({"train": {"stage": "grpo"}}), processor)


# -- the KL reference of a continued adapter ---------------------------------------------------------------


def test_continued_adapter_reference_is_the_sft_model_not_the_base(lora_run, cache_dir, tmp_path):
    from peft import PeftModel
    from trl.trainer.utils import use_adapter

    from vlm_tune.data.sources import load_split
    from vlm_tune.model import load_model, load_processor, resolve_model_path
    from vlm_tune.rl import load_policy, make_grpo_trainer, prompt_dataset

    adapter = lora_run / "final"
    cfg = tiny_cfg(cache_dir, tmp_path / "rl", "train.stage=grpo", "rl.beta=0.04", f"model.adapter={adapter}")
    path = resolve_model_path(cfg)
    processor = load_processor(path, cfg)
    rows = prompt_dataset(
        load_split(cfg.data, "train", cfg.model.cache_dir), [0, 1], None, cfg.prompt.user_template
    )
    trainer = make_grpo_trainer(
        load_policy(load_model(path, cfg), cfg), processor, cfg, rows, tmp_path / "rl", []
    )
    policy = trainer.model
    assert set(policy.peft_config) == {"default", "ref"} and policy.active_adapter == "default"
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".ref." not in n for n in trainable)  # the reference stays frozen
    sft = PeftModel.from_pretrained(load_model(path, cfg), str(adapter)).eval()
    policy.eval()
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        for p in policy.parameters():  # a "trained" policy: every trainable weight moved
            if p.requires_grad:
                p.add_(0.05)
        with use_adapter(policy, "ref"):  # what TRL runs for the KL term when a "ref" adapter exists
            ref = policy(input_ids=ids).logits
        moved = policy(input_ids=ids).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
        want = sft(input_ids=ids).logits
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(ref, base, atol=1e-3) and not torch.allclose(ref, moved, atol=1e-3)


def test_continuing_a_missing_adapter_names_the_key(cache_dir, tmp_path):
    from vlm_tune.model import load_model, resolve_model_path
    from vlm_tune.rl import load_policy

    cfg = tiny_cfg(cache_dir, tmp_path / "rl", "train.stage=grpo", f"model.adapter={tmp_path / 'nope'}")
    with pytest.raises(UserError, match="model.adapter: .*nope holds no adapter_config.json"):
        load_policy(load_model(resolve_model_path(cfg), cfg), cfg)


# -- check -------------------------------------------------------------------------------------------------


def test_check_counts_the_completion_in_the_token_budget(cache_dir, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    sft = tiny_cfg(cache_dir, tmp_path / "run", "train.max_length=80", "rl.max_completion_length=18")
    cfg_path.write_text(sft.to_yaml())
    assert main(["check", str(cfg_path)]) == 0  # the SFT rows fit in 80 tokens
    capsys.readouterr()
    grpo = sft.model_copy(update={"train": sft.train.model_copy(update={"stage": "grpo"})})
    grpo.model.adapter = str(tmp_path / "missing")
    cfg_path.write_text(grpo.to_yaml())
    assert main(["check", str(cfg_path)]) == 1  # rows of 63 tokens do not fit in 80 - 18
    out = capsys.readouterr().out
    assert "over 62 tokens (train.max_length less rl.max_completion_length)" in out
    assert "GRPO stage: from" in out and "missing (set rl.build_adapter)" in out


@pytest.mark.slow
def test_sft_paths_do_not_import_trl():
    import subprocess
    import sys

    code = (
        "import sys, vlm_tune.cli, vlm_tune.train, vlm_tune.check, vlm_tune.rewards, vlm_tune.rl; "
        "print('trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_skip_solved_samples_one_group_per_row_through_the_prompt_contract(lora_run, cache_dir, tmp_path):
    from vlm_tune.data.collate import make_collator
    from vlm_tune.data.sources import LazyRows, load_split
    from vlm_tune.model import load_model, load_processor, resolve_model_path
    from vlm_tune.rl import load_policy
    from vlm_tune.rl_filter import sample_groups

    cfg = tiny_cfg(
        cache_dir,
        tmp_path / "rl",
        f"model.adapter={lora_run / 'final'}",
        "rl.num_generations=3",
        "eval.batch_size=4",
    )
    path = resolve_model_path(cfg)
    processor = load_processor(path, cfg)
    model = load_policy(load_model(path, cfg), cfg)
    collator = make_collator(processor, None, cfg.prompt.user_template)
    rowset = load_split(cfg.data, "train", cfg.model.cache_dir)
    torch.manual_seed(0)
    groups = sample_groups(model, processor, collator, LazyRows(rowset, [0, 1, 2]), cfg)
    assert [len(g) for g in groups] == [3, 3, 3] and all(isinstance(c, str) for g in groups for c in g)
    eot_id = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert model.generation_config.eos_token_id[0] == eot_id  # sampled as the stage samples: stops at the eot
