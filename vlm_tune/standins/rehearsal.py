"""Offline stand-ins for rehearsing a config: a model with the same classes and published processor settings
(random weights, tiny dims) and a dataset in the same column layout, so a config's own commands can run
end to end without the hub.

The stand-in is chosen by the config's `model.name_or_path`; an id not listed in `STAND_INS` is an error,
so a config for a new model family cannot ship without teaching this module its classes and settings.
Chat templates, special tokens and processor settings are the checkpoint's published ones, pinned in its family
module (`vlm_tune.families.pinned`; unverified where no published file was found). The vision dims that set the
tokens per tile (SmolVLM: tile size, patch, pixel shuffle; Gemma 3, PaliGemma, InternVL: patch 14) are from the
models' config.json files, written down (as in `vlm_tune.standins.shapes`), not pinned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_tune.config import BUILTIN_TINY
from vlm_tune.errors import UserError
from vlm_tune.families import all_families, gemma3, internvl, lfm2vl, paligemma, qwen
from vlm_tune.families.pinned import Published
from vlm_tune.standins.real_decoder import BUILTIN_SMOLLM2


@dataclass(frozen=True)
class StandIn:
    """How to stand in for one model id: the family (classes) and its published processor settings."""

    family: str  # "builtin", "idefics3" (SmolVLM), "smolvlm" (SmolVLM2), or a vlm_tune.families name
    tile_size: int = 0  # vision image_size = processor max_image_size
    patch_size: int = 0
    scale_factor: int = 0
    longest_edge: int = 0
    # other families: the checkpoint's published processor/vision settings, passed to Family.build_stand_in
    published: tuple[tuple[str, Any], ...] = ()


def _pairs(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(settings.items()))


STAND_INS: dict[str, StandIn] = {
    BUILTIN_TINY: StandIn("builtin"),
    BUILTIN_SMOLLM2: StandIn("builtin"),
    "HuggingFaceTB/SmolVLM-256M-Instruct": StandIn("idefics3", 512, 16, 4, 2048),
    "HuggingFaceTB/SmolVLM-Instruct": StandIn("idefics3", 384, 14, 3, 1536),
    "HuggingFaceTB/SmolVLM2-256M-Video-Instruct": StandIn("smolvlm", 512, 16, 4, 2048),
    # the other families: the checkpoint's published sizes from the family module's pinned copy (the rest of
    # the processor settings, the chat template and the special tokens are the pinned ones by default)
    "Qwen/Qwen2.5-VL-3B-Instruct": StandIn(
        "qwen2.5-vl", published=_pairs(qwen.checkpoint_settings(qwen.QWEN2_5_VL_PUBLISHED))
    ),
    "Qwen/Qwen3-VL-2B-Instruct": StandIn(
        "qwen3-vl", published=_pairs(qwen.checkpoint_settings(qwen.QWEN3_VL_PUBLISHED))
    ),
    "google/paligemma2-3b-pt-448": StandIn("paligemma", published=_pairs(paligemma.checkpoint_settings())),
    "OpenGVLab/InternVL3-1B-hf": StandIn("internvl", published=_pairs(internvl.checkpoint_settings())),
    "LiquidAI/LFM2-VL-450M": StandIn("lfm2-vl", published=_pairs(lfm2vl.checkpoint_settings())),
    "google/gemma-3-4b-it": StandIn("gemma3", published=_pairs(gemma3.checkpoint_settings())),
}


def stand_in_for(name_or_path: str) -> StandIn:
    if name_or_path not in STAND_INS:
        raise UserError(
            f"no rehearsal stand-in for model {name_or_path!r}; add its classes and published processor "
            f"settings to vlm_tune.standins.rehearsal.STAND_INS (known: {sorted(STAND_INS)})"
        )
    return STAND_INS[name_or_path]


def published_record(name_or_path: str) -> Published:
    """The pinned published values of a checkpoint a stand-in imitates (its family module's record)."""
    for fam in all_families():
        for record in fam.published:
            if record.checkpoint == name_or_path:
                return record
    raise UserError(f"no published values pinned for {name_or_path!r}; add them to its family module")


def build_stand_in_model(name_or_path: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny-dims model + processor with the classes and processor settings of name_or_path."""
    import torch

    from vlm_tune.families.smolvlm import SMOLVLM_256M, build_tokenizer, generation_ids, image_processor

    s = stand_in_for(name_or_path)
    if s.family == "builtin":
        raise UserError(f"{name_or_path} is built by vlm-tune itself; rehearse it as it is")
    out_dir = Path(out_dir)
    fam = next((f for f in all_families() if f.name == s.family), None)
    if s.family not in ("idefics3", "smolvlm") and fam is not None:  # SmolVLM kinds: built below
        built = fam.build_stand_in(out_dir, seed=seed, **dict(s.published))
        (built / "stand_in.json").write_text(json.dumps({"stands_in_for": name_or_path}) + "\n")
        return built
    record = published_record(name_or_path)
    tokenizer = build_tokenizer()  # SmolVLM-256M's published special tokens (SmolVLM2's were not found)
    image_seq_len = (s.tile_size // s.patch_size) ** 2 // s.scale_factor**2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|im_start|>", "<end_of_utterance>")}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": s.tile_size,
        "patch_size": s.patch_size,
    }
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,  # >= 64 input features: the bitsandbytes CPU 4-bit path needs it (facts.md)
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": ids["<end_of_utterance>"],
        "bos_token_id": ids["<|im_start|>"],
        "tie_word_embeddings": False,
    }
    common = {
        "vision_config": vision,
        "text_config": text,
        "scale_factor": s.scale_factor,
        "image_token_id": ids["<image>"],
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    # the checkpoint's published image processor (SmolVLM-Instruct's, unpublished here, is the 256M's at its
    # own sizes)
    sizes = {"size": {"longest_edge": s.longest_edge}, "max_image_size": {"longest_edge": s.tile_size}}
    if s.family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

        processor = Idefics3Processor(
            image_processor=image_processor(SMOLVLM_256M, **sizes),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=record.template(),
        )
        config, model_cls = Idefics3Config(**common), Idefics3ForConditionalGeneration
    else:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        from vlm_tune.families.smolvlm import allow_video_processor_without_torchvision

        allow_video_processor_without_torchvision()
        processor = SmolVLMProcessor(
            image_processor=image_processor(record, **sizes),
            tokenizer=tokenizer,
            video_processor=SmolVLMVideoProcessor(),
            image_seq_len=image_seq_len,
            chat_template=DEFAULT_CHAT_TEMPLATE,  # SmolVLM2's published template was not found (unverified)
        )
        config, model_cls = SmolVLMConfig(**common), SmolVLMForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    for key, value in generation_ids(tokenizer).items():  # SmolVLM-256M's published generation ids
        setattr(model.generation_config, key, value)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "stand_in.json").write_text(json.dumps({"stands_in_for": name_or_path}) + "\n")
    return out_dir


def _chart(i: int, size: tuple[int, int] = (64, 48)) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for b in range(2 + i % 3):
        h = 8 + (7 * (b + i)) % 30
        draw.rectangle([4 + b * 14, size[1] - h, 14 + b * 14, size[1] - 1], fill=(40 * b, 90, 200 - 40 * b))
    return image


def chartqa_stand_in(out_dir: str | Path, rows: int = 8) -> Path:
    """A save_to_disk DatasetDict in the HuggingFaceM4/ChartQA layout: image, query, label (list of
    strings), human_or_machine (class label human/machine); splits train, val, test."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "query": datasets.Value("string"),
            "label": datasets.Sequence(datasets.Value("string")),
            "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
        }
    )

    def split(offset: int) -> Any:
        return datasets.Dataset.from_dict(
            {
                "image": [_chart(offset + i) for i in range(rows)],
                "query": [f"How many bars are there in chart {offset + i}?" for i in range(rows)],
                "label": [[str(2 + (offset + i) % 3)] for i in range(rows)],
                "human_or_machine": [i % 2 for i in range(rows)],
            },
            features=features,
        )

    out_dir = Path(out_dir)
    datasets.DatasetDict({"train": split(0), "val": split(100), "test": split(200)}).save_to_disk(
        str(out_dir)
    )
    return out_dir


def write_video(path: str | Path, n_frames: int = 30, size: int = 32, fps: int = 10) -> Path:
    """A small MPEG-4 clip written with PyAV; frame i is a flat gray of level 4*i (decodable by index)."""
    import av
    import numpy as np

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.gop_size = 5
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(
                np.full((size, size, 3), 4 * i, dtype=np.uint8), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def clips_stand_in(out_dir: str | Path) -> Path:
    """clips.jsonl in the layout of configs/smolvlm2-video-frames.yaml: frames as a folder, a list of
    images and an .mp4 file; a split column with train and test rows. Returns the JSONL path."""
    out_dir = Path(out_dir)
    lines = []
    for i in range(8):
        kind = ("folder", "list", "video")[i % 3]
        if kind == "folder":
            folder = out_dir / f"c{i}"
            folder.mkdir(parents=True, exist_ok=True)
            for f in range(4):
                _chart(i + f).save(folder / f"{f:03d}.png")
            frames: Any = f"c{i}/"
        elif kind == "list":
            (out_dir / f"l{i}").mkdir(parents=True, exist_ok=True)
            frames = []
            for f in range(3):
                _chart(i * 3 + f).save(out_dir / f"l{i}" / f"{f}.png")
                frames.append(f"l{i}/{f}.png")
        else:
            write_video(out_dir / f"v{i}.mp4", n_frames=20)
            frames = f"v{i}.mp4"
        split = "test" if i >= 4 else "train"
        lines.append(
            {"id": f"c{i}", "frames": frames, "question": "What happens?", "answer": "bars", "split": split}
        )
    path = out_dir / "clips.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
