"""The trainer as GPU users meet it, simulated on CPU: one GPU per process whatever the machine shows (never
DataParallel), no host sync in the training step, and samples/s over every rank."""

import time
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from transformers import Trainer, TrainerState
from transformers.training_args import ParallelMode

import vlm_tune.runtime
import vlm_tune.trainer
from vlm_tune.data.collate import IGNORE_INDEX, ChatCollator
from vlm_tune.runtime import Hardware, several_gpus_note

from .conftest import tiny_cfg

FOUR_GPUS = Hardware(cuda=True, bf16=True, four_bit=True, name="A100", gpus=4, cpus=32)


@pytest.fixture
def four_visible_gpus(monkeypatch):
    """A process that sees 4 CUDA devices (torch and vlm-tune's detected hardware), nothing launched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(vlm_tune.runtime, "_DETECTED", FOUR_GPUS)
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_several_visible_gpus_train_on_one_without_dataparallel(cache_dir, tmp_path, four_visible_gpus):
    from vlm_tune.trainer import training_arguments

    args = training_arguments(tiny_cfg(cache_dir, tmp_path / "r", "model.dtype=float32"), tmp_path / "r")
    assert args.device == torch.device("cuda", 0)
    assert args.n_gpu == 1, "transformers counted 4 GPUs: it would wrap the model in nn.DataParallel"
    assert args.parallel_mode == ParallelMode.NOT_PARALLEL
    assert args.train_batch_size == 4, "the batch is train.batch_size, not 4 x batch_size"
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(args=args, accelerator=SimpleNamespace(unwrap_model=lambda m, **k: m))
    assert Trainer._wrap_model(trainer, model, training=False) is model  # the Trainer's DataParallel step


def test_several_gpus_note_names_the_launch_commands():
    note = several_gpus_note(FOUR_GPUS, ["vlm-tune", "train", "cfg.yaml", "train.max_steps=5"])
    assert "uses cuda:0 only" in note
    assert "torchrun --nproc_per_node 4 -m vlm_tune.cli train cfg.yaml train.max_steps=5" in note
    assert "accelerate launch --multi_gpu --num_processes 4 -m vlm_tune.cli train cfg.yaml" in note
    assert "train cfg.yaml`" in several_gpus_note(FOUR_GPUS, ["vlm-tune", "check", "cfg.yaml", "--rows", "3"])
    launched = Hardware(cuda=True, gpus=4, processes=4, local_processes=4)
    assert several_gpus_note(launched, []) is None, "launched for several: nothing to say"
    assert several_gpus_note(Hardware(cuda=True, gpus=1), []) is None
    assert several_gpus_note(Hardware(cuda=False), []) is None


class HostSync(AssertionError):
    pass


def _no_host_sync(monkeypatch):
    """Any tensor → Python number conversion (a device-to-host copy that waits for the GPU) raises."""

    def sync(*args, **kwargs):
        raise HostSync("host sync in the training step")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_token_counts_stay_on_the_device_until_logging(cache_dir, tiny_dir, tmp_path, processor, monkeypatch):
    from vlm_tune.model import load_model
    from vlm_tune.trainer import VlmTrainer, training_arguments

    cfg = tiny_cfg(cache_dir, tmp_path / "r")
    trainer = VlmTrainer(
        model=load_model(str(tiny_dir), cfg),
        args=training_arguments(cfg, tmp_path / "r"),
        train_dataset=[],
        processing_class=processor,
    )
    collator = ChatCollator(processor, None, "{question}", max_length=512)
    rows = [
        {"id": str(i), "images": [Image.new("RGB", (64, 48), (9 * i, 0, 0))], "question": "q", "answers": [a]}
        for i, a in enumerate(["3", "red", "12"])
    ]
    batches = [collator(rows[:2]), collator(rows[2:])]
    sup = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) * 2
    tok = sum(int(b["attention_mask"].sum()) for b in batches) * 2
    # the model's own forward is not what this test is about: the loss is a stand-in tensor
    monkeypatch.setattr(
        vlm_tune.trainer, "supervised_loss", lambda m, b, n=None: (b["labels"].sum() * 0.0, None)
    )
    with monkeypatch.context() as guarded:
        _no_host_sync(guarded)
        for batch in batches * 2:  # four micro-steps (gradient accumulation)
            trainer.compute_loss(trainer.model, batch)
    assert torch.is_tensor(trainer._tokens), "accumulated on the device, read only at logging"
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert logged["supervised_fraction"] == round(sup / tok, 4)
    assert logged["supervised_tokens_per_s"] > 0 and trainer._tokens is None


def test_samples_per_second_counts_every_rank():
    from vlm_tune.trainer import RichProgress

    bar = RichProgress(batch_size=8)  # one rank's samples per optimizer step
    state = TrainerState(max_steps=10, global_step=0)
    bar.on_train_begin(None, state, None)
    try:
        bar.t0 = time.perf_counter() - 10.0  # 10 s ago
        state.global_step = 5
        bar.on_log(SimpleNamespace(world_size=2), state, None, logs={"loss": 1.0, "learning_rate": 1e-3})
        info = bar.progress.tasks[0].fields["info"]
    finally:
        bar.on_train_end(None, state, None)
    assert "8.0 samples/s" in info, info  # 5 steps x 8 samples x 2 ranks / 10 s (one rank alone: 4.0)
