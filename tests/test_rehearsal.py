"""Every config in configs/ is rehearsed: its own commands run through the CLI on a stand-in.

For each configs/*.yaml: a stand-in model chosen by the config's model.name_or_path (same model and
processor classes, published processor settings, random weights, tiny dims; builtin models as they are),
a stand-in dataset in the config's column layout, then `check`, two training steps, `eval --limit 4` and
`predict`. Overrides are only for the model path, sizes (steps, batch, rows, workers) and the data
source; everything else (method, dtype, image settings, prompt, LoRA, columns) is the config's own.
A config whose model or data has no stand-in fails here.
"""

import json
import time
from pathlib import Path

import pytest
import yaml

from vlm_tune.cli import main
from vlm_tune.config import load_config
from vlm_tune.standins.rehearsal import (
    STAND_INS,
    build_stand_in_model,
    chartqa_stand_in,
    clips_stand_in,
    stand_in_for,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
SIZES = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.dataloader_num_workers=0",
    "data.max_train_samples=8",
    "eval.limit=4",
    "eval.batch_size=4",
    "eval.max_new_tokens=3",
    "logging.progress=false",
    "rl.steps=2",  # a GRPO config's stage (train.* sizes its SFT, when it builds model.adapter)
    "rl.num_generations=2",
    "rl.prompts_per_step=2",
    "rl.max_completion_length=3",
]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, real_decoder_cache):
    root = tmp_path_factory.mktemp("rehearsal")
    return {
        "root": root,
        "cache": real_decoder_cache,
        "chartqa": chartqa_stand_in(root / "chartqa"),
        "clips": clips_stand_in(root / "clips"),
    }


def data_overrides(cfg, stand_ins) -> tuple[list[str], Path]:
    """(overrides, an image or frame path for predict) for the config's data source."""
    source = cfg.data.source
    if source == "synthetic":
        return ["data.synthetic.n_train=16", "data.synthetic.n_test=4"], None
    if source == "HuggingFaceM4/ChartQA":
        return [f"data.source={stand_ins['chartqa']}"], None
    if source.endswith(".jsonl") and cfg.data.columns != "chartqa":
        return [f"data.source={stand_ins['clips']}"], stand_ins["clips"].parent
    raise AssertionError(f"no stand-in dataset for data.source {source!r}: add one to this test")


def run_cli(*argv) -> float:
    t = time.perf_counter()
    rc = main([str(a) for a in argv])
    assert rc == 0, f"vlm-tune {' '.join(map(str, argv))} exited {rc}"
    return time.perf_counter() - t


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_rehearsal(path, stand_ins, tmp_path, capsys):
    cfg = load_config(path)
    stand_in = stand_in_for(cfg.model.name_or_path)  # unknown model id → UserError: the suite fails
    model = []
    if stand_in.family != "builtin":
        model_dir = build_stand_in_model(cfg.model.name_or_path, tmp_path / "model")
        model = [f"model.name_or_path={model_dir}"]
    data, frames_dir = data_overrides(cfg, stand_ins)
    run_dir = tmp_path / "run"
    overrides = [f"run.output_dir={run_dir}", f"model.cache_dir={stand_ins['cache']}", *model, *SIZES, *data]
    if cfg.model.adapter:  # a GRPO config's starting adapter: built (rl.build_adapter) under tmp_path
        overrides.append(f"model.adapter={tmp_path / 'sft' / 'final'}")
    seconds = {"check": run_cli("check", path, *overrides)}
    seconds["train"] = run_cli("train", path, *overrides)
    log = json.loads((run_dir / "train_log.json").read_text())
    assert max(e.get("step", 0) for e in log) == 2
    assert (run_dir / "final" / "adapter_config.json").is_file() or cfg.train.method == "full"
    capsys.readouterr()
    seconds["eval"] = run_cli("eval", path, *overrides, "--limit", "4", "--name", "rehearsal")
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 4
    if frames_dir is None:
        image = tmp_path / "chart.png"
        from vlm_tune.standins.rehearsal import _chart

        _chart(3).save(image)
        inputs = ["--image", image]
    else:  # a frame folder and a video file, as the config's data allows
        inputs = ["--frames", frames_dir / "c0", "--image", frames_dir / "v2.mp4"]
    seconds["predict"] = run_cli(
        "predict", "--adapter", run_dir / "final", *inputs, "--question", "How many bars?", "--json"
    )
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(answer["answer"], str)
    with capsys.disabled():
        took = ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
        print(f"\n[rehearsal] {path.name}: {cfg.model.name_or_path} ({stand_in.family}), {took}")


def test_every_config_model_has_a_stand_in():
    """Fast guard (not slow): a config for an unknown model id fails the suite at once."""
    for path in CONFIGS:
        name = yaml.safe_load(path.read_text())["model"]["name_or_path"]
        assert name in STAND_INS, f"{path.name}: no stand-in for {name}"


def test_unknown_model_has_no_stand_in():
    from vlm_tune.errors import UserError

    with pytest.raises(UserError, match="no rehearsal stand-in"):
        stand_in_for("someone/NewVLM-1B")


@pytest.mark.parametrize("model_id", sorted(k for k, v in STAND_INS.items() if v.family != "builtin"))
def test_each_stand_in_has_its_checkpoint_architecture(model_id, tmp_path):
    """The rehearsal's stand-in of a checkpoint is that checkpoint's architecture (SmolVLM2 is not Idefics3)."""
    from vlm_tune.families import all_families

    kind = stand_in_for(model_id).family
    fam = next((f for f in all_families() if f.name == kind), None)
    want = kind if kind in ("idefics3", "smolvlm") else fam.model_types[0]
    out = build_stand_in_model(model_id, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == want
    assert json.loads((out / "stand_in.json").read_text()) == {"stands_in_for": model_id}
