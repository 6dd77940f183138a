"""The GRPO prompt contract per family stand-in: TRL renders the very prompt tokens train/eval/predict use,
completions stop at the family's end-of-turn token, and the loss mask covers completion tokens only."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_tune.config import build_config
from vlm_tune.data.collate import make_collator
from vlm_tune.families import family_of_processor
from vlm_tune.model import load_model, load_processor, setup_training
from vlm_tune.rl import make_grpo_trainer, prompt_dataset

SERVED = ["smolvlm", "qwen2.5-vl", "gemma3", "qwen3-vl", "internvl", "lfm2-vl"]


class Rows:
    """Two chart rows in the canonical layout (different image sizes: the processors tile them differently)."""

    name = "toy"
    rows = [
        {"id": "a", "question": "How many bars are there?", "answers": ["3"], "type": "count", "split": "t"},
        {
            "id": "b",
            "question": "Which colour is the tallest bar?",
            "answers": ["red"],
            "type": "c",
            "split": "t",
        },
    ]
    sizes = [(64, 48), (40, 64)]

    def __len__(self):
        return 2

    def row(self, i, images=True):
        image = Image.new("RGB", self.sizes[i], (200, 40 * i, 30))
        return dict(self.rows[i], images=[image] if images else [])


def grpo_setup(path: Path, tmp_path: Path, system: str | None = None):
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name_or_path": str(path), "image": {"longest_edge": 64}},
        "prompt": {"system": system},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"stage": "grpo", "max_length": 512},
        "rl": {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 4, "steps": 1},
        "logging": {"progress": False},
    }
    cfg = build_config(raw)
    processor = load_processor(str(path), cfg)
    model = setup_training(load_model(str(path), cfg), cfg)
    collator = make_collator(processor, cfg.prompt.system, cfg.prompt.user_template)
    dataset = prompt_dataset(Rows(), [0, 1], cfg.prompt.system, cfg.prompt.user_template)
    trainer = make_grpo_trainer(model, processor, cfg, dataset, tmp_path / "run", [])
    return trainer, processor, collator, dataset


@pytest.mark.parametrize(
    "name",
    [
        n if n in ("smolvlm", "qwen2.5-vl", "gemma3") else pytest.param(n, marks=pytest.mark.slow)
        for n in SERVED
    ],
)
def test_prompt_is_the_training_prompt_and_loss_covers_the_completion_only(name, family_stand_ins, tmp_path):
    torch.manual_seed(0)
    system = "You read charts." if name == "qwen2.5-vl" else None  # a system turn travels too
    trainer, processor, collator, dataset = grpo_setup(family_stand_ins[name], tmp_path, system)
    tok = processor.tokenizer
    eot_id = tok.convert_tokens_to_ids(family_of_processor(processor).end_of_turn)
    assert eot_id in trainer.eos_token_ids  # completions stop at the family's end of turn

    # the prompt TRL tokenizes (its chat template call, images placed by TRL) == the collator's prompt
    rows = [Rows().row(i) for i in range(2)]
    inputs = [dataset[i // 2] for i in range(4)]  # two groups of two completions
    trainer.generation_config.forced_eos_token_id = (
        eot_id  # random weights: make the last token the end of turn
    )
    out = trainer._generate_and_score_completions(inputs)
    for b in range(4):
        gen = collator.generation_batch([rows[b // 2]])
        want = gen["input_ids"][0][gen["attention_mask"][0].bool()].tolist()
        assert out["prompt_ids"][b][out["prompt_mask"][b].bool()].tolist() == want

    # the loss mask: completion tokens up to and including the first stop token, never a prompt or image token
    image_ids = collator.image_ids
    ids, mask = out["completion_ids"], out["completion_mask"]
    assert mask.shape == ids.shape  # TRL's loss runs on logits_to_keep = the completion positions only
    for b in range(4):
        kept = ids[b][mask[b].bool()].tolist()
        stops = [k for k, t in enumerate(kept) if t in trainer.eos_token_ids]
        assert stops and stops[0] == len(kept) - 1, tok.decode(kept)  # ends at its first stop token
        assert not image_ids & set(kept)
        assert tok.decode(kept, skip_special_tokens=False).endswith(tok.decode([kept[-1]]))
        assert mask[b][len(kept) :].sum() == 0
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
    loss = trainer.compute_loss(trainer.model, out)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads) or out["advantages"].abs().sum() == 0
