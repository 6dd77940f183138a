"""Where a saved stand-in departs from the published files of the checkpoint it imitates (`Published`).

`observed` reads a saved stand-in's chat template, special tokens, generation ids and processor settings;
`differences` compares them with its family's pinned published values (tests/test_published.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_tune.families import family_of_processor, load_processor
from vlm_tune.families.pinned import NAMED_TOKENS, Published, flatten


def observed(directory: str | Path, processor: Any = None) -> dict[str, Any]:
    """A saved stand-in's values under `Published.expected`'s keys (its saved chat template, the special tokens
    of its tokenizer as loaded, its generation ids as token strings, its saved processor settings), and its
    image processor as loaded under "image_processor.*". `processor`: the directory's, if already loaded."""

    directory = Path(directory)
    processor = processor if processor is not None else load_processor(str(directory))
    fam = family_of_processor(processor)
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    template = directory / "chat_template.jinja"
    out: dict[str, Any] = {"chat_template": template.read_text() if template.is_file() else None}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        out[f"tokens.{key}"] = getattr(tok, key)
    for name in NAMED_TOKENS:
        value = getattr(tok, name, None)
        out[f"tokens.named.{name}"] = value if isinstance(value, str) else None
    out["tokens.adds_bos"] = tok.bos_token_id is not None and tok("1")["input_ids"][:1] == [tok.bos_token_id]
    out["tokens.end_of_turn"] = fam.end_of_turn if fam.end_of_turn in vocab else None
    out["tokens.image_tokens"] = sorted(t for t in fam.image_tokens if t in vocab)
    gen = json.loads((directory / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gen.get(key)
        if isinstance(value, list):
            out[f"generation.{key}"] = tok.convert_ids_to_tokens(value)
        else:
            out[f"generation.{key}"] = None if value is None else tok.convert_ids_to_tokens(value)
    saved = json.loads((directory / "processor_config.json").read_text())
    proc = {k: v for k, v in saved.items() if k not in ("image_processor", "video_processor")}
    out |= {f"processor.{k}": v for k, v in flatten(proc).items()}
    out |= {f"image_processor.{k}": v for k, v in flatten(processor.image_processor.to_dict()).items()}
    return out


def differences(published: Published, directory: str | Path) -> dict[str, tuple[Any, Any]]:
    """Where a saved stand-in departs from the checkpoint's pinned values: key → (published, stand-in).

    Special tokens, generation ids and processor-level settings are compared on the published keys; the image
    processor on every key of its settings, the published file read through the stand-in's own image processor
    class (so class defaults and renamed keys count as transformers 5 reads the checkpoint)."""
    processor = load_processor(str(directory))
    seen = observed(directory, processor)
    want = published.expected()
    if "processor_settings" not in published.unverified:
        cls = type(processor.image_processor)
        ip, _ = published.settings()
        want |= {f"image_processor.{k}": v for k, v in flatten(cls.from_dict(ip).to_dict()).items()}
        keys = set(want) | {k for k in seen if k.startswith("image_processor.")}
    else:
        keys = set(want)
    return {k: (want.get(k), seen.get(k)) for k in sorted(keys) if want.get(k) != seen.get(k)}
