"""Model families: the same supervision guarantee, budget and training checks for every family's stand-in.

Each family's offline stand-in (random weights, small dims, the family's processor class, special tokens and
published chat template) is built once per session and reloaded through from_pretrained.
"""

import hashlib
import json

import pytest
import torch
from PIL import Image

from vlm_tune.config import build_config
from vlm_tune.data.collate import IGNORE_INDEX, ChatCollator, count_tokens, image_token_ids, make_collator
from vlm_tune.errors import UserError
from vlm_tune.families import all_families, family_of_config, family_of_processor
from vlm_tune.families import load_processor as load_family_processor

TEMPLATE = "{question}\nAnswer with a single word or number."
FAMILIES = ["smolvlm", "qwen2.5-vl", "qwen3-vl", "paligemma", "internvl", "lfm2-vl", "gemma3"]
CHAT = [f for f in FAMILIES if f != "paligemma"]  # chat-template families (PaliGemma: prefix-LM)
# what separates the assistant marker from the answer in each published template (it is not supervised)
EOT = {
    "smolvlm": "<end_of_utterance>",
    "qwen2.5-vl": "<|im_end|>",
    "qwen3-vl": "<|im_end|>",
    "paligemma": "<eos>",
    "internvl": "<|im_end|>",
    "lfm2-vl": "<|im_end|>",
    "gemma3": "<end_of_turn>",
}
LEAD = {
    "smolvlm": " ",
    "qwen2.5-vl": "",
    "qwen3-vl": "",
    "paligemma": "",
    "internvl": "",
    "lfm2-vl": "",
    "gemma3": "",
}
PROCESSOR_CLASS = {
    "smolvlm": "Idefics3Processor",
    "qwen2.5-vl": "Qwen2_5_VLProcessor",
    "qwen3-vl": "Qwen3VLProcessor",
    "paligemma": "PaliGemmaProcessor",
    "internvl": "InternVLProcessor",
    "lfm2-vl": "Lfm2VlProcessor",
    "gemma3": "Gemma3Processor",
}


def fam(name):
    return next(f for f in all_families() if f.name == name)


@pytest.fixture(scope="session")
def stand_ins(family_stand_ins):
    """name → directory of that family's stand-in (SmolVLM's is the shared tiny model)."""
    return family_stand_ins


@pytest.fixture(scope="session")
def processors(stand_ins):
    return {name: load_family_processor(str(d)) for name, d in stand_ins.items()}


def img(w=64, h=64, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def row(answer, images, question="How many bars are there?", rid="r", messages=None):
    r = {"id": rid, "images": images, "question": question, "answers": [answer]}
    if messages:
        r["messages"] = messages
    return r


def supervised(processor, batch, b):
    ids, labels = batch["input_ids"][b], batch["labels"][b]
    return processor.tokenizer.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)


# -- detection ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_family_detected_from_saved_config_and_processor(name, stand_ins, processors):
    config = json.loads((stand_ins[name] / "config.json").read_text())
    assert family_of_config(config).name == name
    assert family_of_processor(processors[name]).name == name
    saved = json.loads((stand_ins[name] / "processor_config.json").read_text())
    assert saved["processor_class"] == PROCESSOR_CLASS[name]  # standard files, loadable where torchvision is
    assert type(processors[name]).__name__ == PROCESSOR_CLASS[name]


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UserError) as err:
        family_of_config({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]})
    msg = str(err.value)
    assert "'llava'" in msg and "LlavaForConditionalGeneration" in msg
    for f in all_families():
        assert f.name in msg


def test_unknown_builtin_lists_the_builtins(tmp_path):
    from vlm_tune.model import resolve_model_path

    cfg = build_config({"model": {"name_or_path": "builtin:tiny-llava", "cache_dir": str(tmp_path)}}, [])
    with pytest.raises(UserError, match="builtin:tiny-qwen2.5-vl"):
        resolve_model_path(cfg)


def test_builtin_stand_in_built_once_in_the_cache(tmp_path):
    from vlm_tune.model import resolve_model_path

    cfg = build_config({"model": {"name_or_path": "builtin:tiny-qwen2.5-vl", "cache_dir": str(tmp_path)}}, [])
    path = resolve_model_path(cfg)
    assert path == str(tmp_path / "tiny-qwen2.5-vl")
    stamp = (tmp_path / "tiny-qwen2.5-vl" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(cfg) == path  # reused, not rebuilt
    assert (tmp_path / "tiny-qwen2.5-vl" / "model.safetensors").stat().st_mtime_ns == stamp
    assert family_of_config(json.loads((tmp_path / "tiny-qwen2.5-vl" / "config.json").read_text())).name == (
        "qwen2.5-vl"
    )


def test_qwen3_vl_template_is_unchanged():
    """Qwen3-VL's template is unverified (no published copy pinned: tests/test_published.py); it must at least
    stay the text it was written down as."""
    from vlm_tune.families.qwen import QWEN3_VL_CHAT_TEMPLATE

    digest = hashlib.sha256(QWEN3_VL_CHAT_TEMPLATE.encode()).hexdigest()
    assert digest == "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"


# -- supervision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CHAT)  # PaliGemma has no turns: tests/test_family_paligemma.py
def test_supervision_is_exactly_answers_and_end_of_turn(name, processors):
    p = processors[name]
    eot, lead = EOT[name], LEAD[name]
    collator = ChatCollator(p, "You read charts.", TEMPLATE, max_length=4096)
    multi = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
        {"role": "user", "content": [{"type": "text", "text": "Which is tallest?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    ]
    rows = [
        row("3", [img()]),
        row("blue", [img(), img(32, 32), img(64, 40)], rid="b"),
        row("Democrat (scores 60 to 100)", [img(48, 64)], question="Which party? " * 5, rid="c"),
        row("B", [img()], rid="m", messages=multi),
    ]
    batch = collator(rows)  # right-padded training batch
    assert batch["attention_mask"].sum(1).unique().numel() == 4  # really padded
    assert [supervised(p, batch, b) for b in range(4)] == [
        f"{lead}3{eot}",
        f"{lead}blue{eot}",
        f"{lead}Democrat (scores 60 to 100){eot}",
        f"{lead}4{eot}{lead}B{eot}",
    ]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    image_ids = torch.tensor(sorted(image_token_ids(p)))
    assert len(image_ids) >= 2
    is_image = torch.isin(batch["input_ids"], image_ids)
    assert is_image.sum() > 0 and (batch["labels"][is_image] == IGNORE_INDEX).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_bos_appears_once_where_the_tokenizer_has_one(name, processors):
    """SmolVLM (<|im_start|>), Gemma 3 (<bos>) and LFM2-VL (<|startoftext|>) templates write their bos token,
    PaliGemma's processor writes <bos> after the images; nothing adds a second one, in training or generation
    rows. Qwen and InternVL have none."""
    p = processors[name]
    tok = p.tokenizer
    assert (tok.bos_token is None) == (name in ("qwen2.5-vl", "qwen3-vl", "internvl"))
    collator = make_collator(p, "sys", TEMPLATE, max_length=4096)
    rows = [row("3", [img()]), row("7", [img(), img(40, 64)], question="long " * 10, rid="b")]
    for batch in (collator(rows), collator.generation_batch(rows)):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            ids = ids[mask.bool()]
            if tok.bos_token is None:
                continue
            assert int((ids == tok.bos_token_id).sum()) == 1
            if name != "paligemma":  # the images come first there
                assert ids[0] == tok.bos_token_id


@pytest.mark.parametrize("name", CHAT)
def test_string_contents_train_like_content_lists(name, processors):
    """A conversational row whose contents are plain strings gives the batch the same row with content lists
    gives (SmolVLM's published template would drop a string's text)."""
    p = processors[name]
    collator = ChatCollator(p, None, TEMPLATE, max_length=4096)
    parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
        {"role": "user", "content": [{"type": "text", "text": "Which is tallest?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    ]
    strings = [parts[0]] + [{"role": m["role"], "content": m["content"][0]["text"]} for m in parts[1:]]
    a = collator([row("B", [img()], messages=parts)])
    b = collator([row("B", [img()], messages=strings)])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert supervised(p, b, 0) == f"{LEAD[name]}4{EOT[name]}{LEAD[name]}B{EOT[name]}"


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_batch_left_padded_prefix_of_training_row(name, processors):
    p = processors[name]
    collator = make_collator(p, None, TEMPLATE, max_length=4096)
    rows = [row("3", [img()]), row("7", [img(), img(40, 64)], question="long " * 10, rid="b")]
    gen = collator.generation_batch(rows)
    assert gen["attention_mask"][0, 0] == 0 and gen["attention_mask"][0, -1] == 1  # left-padded
    for b, r in enumerate(rows):
        prompt = gen["input_ids"][b][gen["attention_mask"][b].bool()]
        train = collator([r])
        n = len(prompt)
        assert torch.equal(train["input_ids"][0, :n], prompt)
        assert (train["labels"][0, :n] == IGNORE_INDEX).all() and (
            train["labels"][0, n:] != IGNORE_INDEX
        ).any()


@pytest.mark.parametrize("name", FAMILIES)
def test_preflight_count_equals_collated_length(name, processors):
    p = processors[name]
    collator = make_collator(p, "sys", TEMPLATE, max_length=4096)
    for images in ([img()], [img(), img(32, 20)], [img(100, 37)]):
        r = row("42", images)
        counts = count_tokens(p, collator, r)
        batch = collator([r])
        assert counts["total"] == batch["input_ids"].shape[1]
        assert counts["supervised"] == int((batch["labels"] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_length_equals_generation_batch_length(name, processors):
    """The length generation batches are grouped by: exact, from image sizes alone (`ImageSize`s)."""
    from vlm_tune.data.collate import prompt_length
    from vlm_tune.data.images import ImageSize

    p = processors[name]
    collator = make_collator(p, "sys", TEMPLATE)
    for images in ([img()], [img(), img(32, 20)], [img(100, 37)]):
        r = row("42", images)
        sized = {**r, "images": [ImageSize(*im.size) for im in images]}
        assert prompt_length(p, collator, sized) == collator.generation_batch([r])["input_ids"].shape[1]


# -- resolution knobs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_each_resolution_knob_changes_the_token_count(name, stand_ins):
    from vlm_tune.model import load_processor

    def tokens(*overrides):
        cfg = build_config({"model": {"name_or_path": str(stand_ins[name])}}, list(overrides))
        p = load_processor(str(stand_ins[name]), cfg)
        collator = ChatCollator(p, None, TEMPLATE)
        r = row("3", [img(200, 120)])
        n = count_tokens(p, collator, r)
        assert n["total"] == collator([r])["input_ids"].shape[1]  # the knob reached the real processor too
        return n["image"]

    default = tokens()
    assert tokens("model.image.max_pixels=4096") < default
    assert tokens("model.image.longest_edge=64") == tokens("model.image.max_pixels=4096")
    assert tokens("model.image.min_pixels=65536", "model.image.max_pixels=65536") > default
    with pytest.raises(UserError, match="model.image.tile_size"):
        tokens("model.image.tile_size=32")


def test_smolvlm_rejects_qwen_pixel_knobs(stand_ins):
    from vlm_tune.model import load_processor

    cfg = build_config(
        {"model": {"name_or_path": str(stand_ins["smolvlm"])}}, ["model.image.max_pixels=4096"]
    )
    with pytest.raises(UserError, match="model.image.max_pixels"):
        load_processor(str(stand_ins["smolvlm"]), cfg)


# -- LoRA presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_lora_presets_resolve_to_the_family_modules(name, stand_ins):
    import re

    from transformers import AutoModelForImageTextToText

    from vlm_tune.model import lora_target_regex

    f = fam(name)
    model = AutoModelForImageTextToText.from_pretrained(stand_ins[name])
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = {
        t: {n for n in linear if re.fullmatch(lora_target_regex([t], f.target_presets), n)}
        for t in f.target_presets
    }
    assert all(hit.values()), hit
    if "projector" not in hit:  # no nn.Linear in the projector (Gemma 3): trained fully instead
        assert f.full_projector and all(
            f"model.{m}".startswith(f.projector_modules) for m in f.full_projector
        )
    hit.setdefault("projector", set())
    assert not (hit["decoder"] & hit["projector"]) and not (hit["projector"] & hit["vision"])
    assert all(n.startswith(f.projector_modules) for n in hit["projector"])
    assert all(n.startswith(f.vision_module) and not n.startswith(f.projector_modules) for n in hit["vision"])
    assert not any(n.startswith(f.vision_module) for n in hit["decoder"])
    # every linear layer of the projector is covered
    assert hit["projector"] == {n for n in linear if n.startswith(f.projector_modules)}


# -- training, eval, predict --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen3-vl", "internvl", "lfm2-vl", "gemma3"])
def test_three_steps_train_decoder_and_projector_only_then_eval_and_predict(name, stand_ins, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vlm_tune.inference import load_for_inference, predict
    from vlm_tune.train import train

    raw = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"name_or_path": str(stand_ins[name])},
        "data": {"synthetic": {"n_train": 12, "n_test": 4, "seed": 1}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["decoder", "projector"]},
        "train": {"batch_size": 4, "max_steps": 3, "save_steps": 3, "learning_rate": 1e-2, "max_length": 256},
        "eval": {"batch_size": 4, "max_new_tokens": 2, "baselines": []},
        "logging": {"progress": False},
    }
    run = train(build_config(raw, []))
    f = fam(name)
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(
        v.abs().sum() > 0 for v in lora_b.values()
    )  # B starts at zero: any change is training
    assert any("language_model" in k for k in lora_b)
    saved = [k.split("base_model.model.")[-1] for k in adapter]
    if f.full_projector:  # no nn.Linear in it (Gemma 3): trained fully, saved whole, changed from the base
        base_weights = AutoModelForImageTextToText.from_pretrained(stand_ins[name]).state_dict()
        projector = [k for k in saved if k.startswith(f.projector_modules)]
        assert projector and any(
            not torch.equal(adapter["base_model.model." + k], base_weights[k]) for k in projector
        ), projector
    else:
        assert any(k.split("base_model.model.")[-1].startswith(f.projector_modules) for k in lora_b)
    assert not any(k.startswith(f.vision_module) and not k.startswith(f.projector_modules) for k in saved)
    base, again = (AutoModelForImageTextToText.from_pretrained(stand_ins[name]) for _ in range(2))
    for (n, a), (_, b) in zip(base.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n  # frozen weights untouched on disk
    metrics = json.loads((run / "eval" / "final" / "metrics.json").read_text())
    assert metrics["n"] == 4
    model, processor, prompt = load_for_inference(run / "final")
    assert type(processor).__name__ == PROCESSOR_CLASS[name]
    answers = predict(
        model, processor, prompt, [{"images": [img()], "question": "How many bars are there?"}], 2
    )
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_tower_spares_the_projector_and_train_vision_saves_the_tower(name, stand_ins):
    from transformers import AutoModelForImageTextToText

    from vlm_tune.model import lora_module_names, setup_training

    f = fam(name)
    base = {"model": {"name_or_path": str(stand_ins[name])}, "logging": {"progress": False}}
    full = setup_training(
        AutoModelForImageTextToText.from_pretrained(stand_ins[name]),
        build_config(base, ["train.method=full"]),
    )
    grads = {n: p.requires_grad for n, p in full.named_parameters()}
    projector = [n for n in grads if n.startswith(f.projector_modules)]
    tower = [n for n in grads if n.startswith(f.vision_module) and not n.startswith(f.projector_modules)]
    assert projector and all(grads[n] for n in projector)
    assert tower and not any(grads[n] for n in tower)
    lora = setup_training(
        AutoModelForImageTextToText.from_pretrained(stand_ins[name]),
        build_config(base, ["model.train_vision=true"]),
    )
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    in_projector = {n for n in trainable if n.split("base_model.model.")[-1].startswith(f.projector_modules)}
    # LoRA on the projector, or (no nn.Linear in it: Gemma 3) the whole projector
    assert any("lora_" in n or (f.full_projector and "modules_to_save" in n) for n in in_projector)
    tower_trainable = {n for n in trainable if "modules_to_save" in n} - in_projector
    # the whole tower (not the projector) is trained fully and saved with the adapter
    assert tower_trainable and not any(
        n.split(".modules_to_save")[0].endswith("merger") for n in tower_trainable
    )
    n_tower = sum(
        p.numel() for n, p in lora.named_parameters() if "modules_to_save" in n and n not in in_projector
    )
    assert n_tower == sum(
        p.numel()
        for n, p in AutoModelForImageTextToText.from_pretrained(stand_ins[name]).named_parameters()
        if n.startswith(f.vision_module) and not n.startswith(f.projector_modules)
    )
    assert lora_module_names(lora)


def test_tiny_model_command_builds_each_family(tmp_path, capsys):
    from vlm_tune.cli import main

    assert main(["tiny-model", str(tmp_path / "q"), "--family", "qwen3-vl", "--seed", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "q")
    assert family_of_config(json.loads((tmp_path / "q" / "config.json").read_text())).name == "qwen3-vl"
    with pytest.raises(SystemExit) as err:
        main(["tiny-model", str(tmp_path / "x"), "--family", "llava"])
    assert err.value.code == 2
    assert "qwen2.5-vl" in capsys.readouterr().err  # the choices are listed


@pytest.mark.parametrize("name", ["qwen2.5-vl", "internvl"])
def test_processor_built_without_torchvision_saves_the_checkpoint_video_config(name, stand_ins, tmp_path):
    """The image-only processor (CPU installs) saves the checkpoint's own video config byte for byte, or
    (built here) one naming the family's video processor: AutoProcessor needs it where torchvision is."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(stand_ins[name], ckpt)
    built = json.loads((ckpt / "video_preprocessor_config.json").read_text())
    assert built["video_processor_type"].endswith("VideoProcessor")
    published = dict(built, fps=2.0, note="as published")  # a file the family would not derive itself
    (ckpt / "video_preprocessor_config.json").write_text(json.dumps(published))
    load_family_processor(str(ckpt)).save_pretrained(tmp_path / "saved")
    saved = (tmp_path / "saved" / "video_preprocessor_config.json").read_bytes()
    assert saved == (ckpt / "video_preprocessor_config.json").read_bytes()


def test_schema_and_readme_name_every_family_stand_in():
    from pathlib import Path

    from vlm_tune.config import ModelSection

    doc = ModelSection.model_fields["name_or_path"].description
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for f in all_families():
        assert f"'{f.builtin}'" in doc, f.builtin
        assert f"`{f.builtin}`" in readme, f.builtin
