"""Performance levers keep the math: checkpointing without the frozen vision tower, logits only where
supervised, length-grouped batches, dataloader workers."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlm_tune.data.collate import IGNORE_INDEX, ChatCollator
from vlm_tune.trainer import LengthGroupedSampler, supervised_loss

from .conftest import tiny_cfg


def _rows(sizes):
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    return [
        {
            "id": f"r{i}",
            "images": [Image.new("RGB", (w, h), colors[i % 3])],
            "question": "How many bars are there?",
            "answers": [str(i % 5 + 2)],
        }
        for i, (w, h) in enumerate(sizes)
    ]


@pytest.fixture
def batch(processor):
    collator = ChatCollator(processor, "You read charts.", "{question}\nAnswer briefly.", max_length=4096)
    return collator(_rows([(64, 64), (40, 64), (64, 30)]))


def _lora_model(tiny_dir, cache_dir, tmp_path, *overrides):
    from vlm_tune.model import load_model, setup_training

    cfg = tiny_cfg(cache_dir, tmp_path / "unused", "lora.dropout=0.0", *overrides)
    torch.manual_seed(0)  # same LoRA init in every copy
    model = setup_training(load_model(str(tiny_dir), cfg), cfg)
    for n, p in model.named_parameters():  # non-zero lora_B, so LoRA changes the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def _vision_output_requires_grad(model, batch, loss_fn):
    seen = {}
    vision = next(m for n, m in model.named_modules() if n.endswith("model.vision_model"))

    def hook(module, inputs, output):
        seen.setdefault("requires_grad", output.last_hidden_state.requires_grad)

    handle = vision.register_forward_hook(hook)
    loss = loss_fn(model, batch)
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return seen["requires_grad"], loss.detach(), grads


def _model_loss(model, batch):
    return model(**batch).loss


def test_checkpointing_keeps_frozen_vision_tower_out_of_the_graph(tiny_dir, cache_dir, tmp_path, batch):
    ref = _lora_model(tiny_dir, cache_dir, tmp_path)
    in_graph, ref_loss, ref_grads = _vision_output_requires_grad(ref, batch, _model_loss)
    assert in_graph is False  # LoRA on decoder + projector: the tower runs forward only

    # transformers' own switch hooks every input embedding, the vision tower's included (the trap)
    trap = _lora_model(tiny_dir, cache_dir, tmp_path)
    trap.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert _vision_output_requires_grad(trap, batch, _model_loss)[0] is True

    ours = _lora_model(tiny_dir, cache_dir, tmp_path, "train.gradient_checkpointing=true")  # setup_training
    assert ours.get_base_model().model.text_model.gradient_checkpointing
    in_graph, loss, grads = _vision_output_requires_grad(ours, batch, _model_loss)
    assert in_graph is False
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


def test_checkpointing_still_trains_a_vision_lora(tiny_dir, cache_dir, tmp_path, batch):
    from vlm_tune.model import enable_gradient_checkpointing

    model = _lora_model(tiny_dir, cache_dir, tmp_path, "lora.targets=[decoder,projector,vision]")
    enable_gradient_checkpointing(model)
    in_graph, _, grads = _vision_output_requires_grad(model, batch, _model_loss)
    assert in_graph is True
    vision_grads = [g for k, g in grads.items() if "vision_model" in k and "lora_A" in k]
    assert vision_grads and all(g.abs().sum() > 0 for g in vision_grads)


def test_supervised_loss_equals_full_logits_loss(tiny_dir, cache_dir, tmp_path, batch):
    model = _lora_model(tiny_dir, cache_dir, tmp_path)
    _, ref_loss, ref_grads = _vision_output_requires_grad(model, batch, _model_loss)
    logits_rows = []
    head = model.get_base_model().lm_head
    handle = head.register_forward_hook(
        lambda module, inputs, output: logits_rows.append(output.shape) and None
    )
    _, loss, grads = _vision_output_requires_grad(model, batch, lambda m, b: supervised_loss(m, b)[0])
    handle.remove()

    n_sup = int((batch["labels"] != IGNORE_INDEX).sum())
    assert logits_rows == [torch.Size([n_sup, head.out_features])]  # one row per supervised token
    assert n_sup < batch["input_ids"].numel() / 10
    torch.testing.assert_close(loss, ref_loss)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)
    # gradient accumulation: the Trainer passes the supervised-token count of all micro-batches
    summed, _ = supervised_loss(model, batch, num_items_in_batch=torch.tensor(4 * n_sup))
    torch.testing.assert_close(summed * 4, ref_loss)


def test_supervised_loss_refuses_a_model_without_logits_masks(batch):
    from types import SimpleNamespace

    from vlm_tune.errors import UserError

    def old_style(input_ids, logits_to_keep=0, **kwargs):  # ignores a mask: full logits back
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 10))

    def no_kwarg(input_ids, attention_mask, pixel_values, pixel_attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 10))

    for model in (old_style, no_kwarg):
        with pytest.raises(UserError, match="train.supervised_logits_only=false"):
            supervised_loss(model, batch)


def test_length_grouped_sampler_groups_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(50, 1200, (512,), generator=gen).tolist()
    sampler = LengthGroupedSampler(lengths, group=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(512))
    assert list(LengthGroupedSampler(lengths, group=8, seed=3)) == order  # a resumed run: same order
    sampler.set_epoch(1)
    assert list(sampler) != order

    def padding(idx):  # padded positions / all positions, batches of 8
        batches = [[lengths[i] for i in idx[j : j + 8]] for j in range(0, len(idx), 8)]
        return sum(len(b) * max(b) - sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)

    random_order = torch.randperm(512, generator=gen).tolist()
    assert padding(order) < padding(random_order) / 5
    # not sorted overall: long and short batches alternate
    firsts = [max(lengths[i] for i in order[j : j + 8]) for j in range(0, 512, 8)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


@pytest.mark.slow
def test_supervised_logits_training_equals_full_logits_training(cache_dir, tmp_path):
    """Two optimizer steps with gradient accumulation: same losses and adapters either way."""
    from vlm_tune.train import train

    runs = {}
    for flag in ("true", "false"):
        runs[flag] = train(
            tiny_cfg(
                cache_dir,
                tmp_path / flag,
                f"train.supervised_logits_only={flag}",
                "train.max_steps=2",
                "train.batch_size=2",
                "train.gradient_accumulation_steps=2",
                "eval.at_end=false",
                "eval.baselines=[]",
            )
        )
    losses = {
        k: [h["loss"] for h in json.loads((r / "train_log.json").read_text()) if "loss" in h]
        for k, r in runs.items()
    }
    assert len(losses["true"]) == 2
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    a = load_file(str(runs["true"] / "final" / "adapter_model.safetensors"))
    b = load_file(str(runs["false"] / "final" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_all_levers_together_train(cache_dir, tmp_path):
    """Checkpointing + length grouping + 2 dataloader workers: the run trains, from the grouped sampler."""
    from vlm_tune import train as train_module

    seen = []
    real = train_module.VlmTrainer

    class Spy(real):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            seen.append(sampler)
            return sampler

        def training_step(self, model, inputs, *args, **kwargs):
            seen.append(int(inputs["attention_mask"].sum(1).max()))
            return super().training_step(model, inputs, *args, **kwargs)

    train_module.VlmTrainer = Spy
    try:
        run = train_module.train(
            tiny_cfg(
                cache_dir,
                tmp_path / "levers",
                "train.gradient_checkpointing=true",
                "train.group_by_length=true",
                "train.dataloader_num_workers=2",
                "train.max_steps=3",
                "eval.at_end=false",
                "eval.baselines=[]",
            )
        )
    finally:
        train_module.VlmTrainer = real
    sampler, *max_lengths = seen
    assert isinstance(sampler, LengthGroupedSampler) and len(sampler.lengths) == 48
    assert len(max_lengths) == 3
    log = [h for h in json.loads((run / "train_log.json").read_text()) if "loss" in h]
    assert len(log) == 3 and all(h["loss"] == h["loss"] for h in log)
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_dataloader_workers_auto_is_zero_on_cpu_and_several_on_a_gpu(tmp_path):
    from vlm_tune.config import ConfigError, build_config
    from vlm_tune.runtime import Hardware, data_workers
    from vlm_tune.trainer import training_arguments

    assert build_config({}).train.dataloader_num_workers == "auto"
    assert data_workers("auto", Hardware(cuda=False, cpus=16))[0] == 0  # on CPU the cores train
    assert data_workers("auto", Hardware(cuda=True, cpus=16))[0] == 4
    assert data_workers("auto", Hardware(cuda=True, cpus=2))[0] == 1
    assert data_workers(3, Hardware(cuda=False, cpus=2))[0] == 3
    expected = data_workers("auto")[0]  # this machine's decision (0 here: no CUDA)
    assert training_arguments(build_config({}), tmp_path).dataloader_num_workers == expected
    args = training_arguments(build_config({}, ["train.dataloader_num_workers=2"]), tmp_path)
    assert args.dataloader_num_workers == 2
    with pytest.raises(
        ConfigError, match="train.dataloader_num_workers: got -1; expected a whole number >= 0"
    ):
        build_config({}, ["train.dataloader_num_workers=-1"])
