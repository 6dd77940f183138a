"""Pinned copies of what the imitated checkpoints publish (chat template, special tokens, processor settings).

No model hub is reachable where vlm-tune is built and tested, so each family keeps its own copy of the files a
checkpoint publishes (chat template, special tokens, processor settings) in `published/<folder>/` next to
the family modules: verbatim or transcribed, each with its sha256 and its source (a GitHub repo/path/commit or
a huggingface.co page), declared by a `Published` record in the family's module. The stand-in builders take
their chat template, special tokens and processor settings from these records (tiny dims and vocabularies
excepted); `vlm_tune.standins.published_check` tells where a saved stand-in departs from them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "published"
ASPECTS = ("chat_template", "special_tokens", "processor_settings")
# named special tokens a processor reads from its tokenizer (tokenizer_config.json "extra_special_tokens")
NAMED_TOKENS = (
    "boi_token",
    "eoi_token",
    "image_token",
    "start_image_token",
    "end_image_token",
    "context_image_token",
    "video_token",
    "image_start_token",
    "image_end_token",
    "image_thumbnail",
)


@dataclass(frozen=True)
class Pinned:
    """One published file, copied into vlm_tune/families/published/."""

    file: str  # path under published/, e.g. "smolvlm/chat_template.json"
    sha256: str
    source: str  # where the copy comes from: GitHub repo/path/commit, or a huggingface.co page and hub commit
    # "verbatim" (the hub file's bytes), "transcribed" (a hub page's values, JSON rebuilt), "extracted" (strings
    # and ids taken from the files named in `source`), "derived" (not published by the checkpoint)
    how: str

    def read(self) -> bytes:
        """The file's bytes; a copy that no longer matches its sha256 is a RuntimeError naming it."""
        data = (DATA / self.file).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise RuntimeError(f"vlm_tune/families/published/{self.file} does not match its pinned sha256")
        return data

    def text(self) -> str:
        return self.read().decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.read())


@dataclass(frozen=True)
class Published:
    """What one checkpoint publishes, as vlm-tune pins it: where each aspect is read from, the aspects
    (ASPECTS, or finer keys such as "special_tokens.adds_bos") no published file was found for (unverified:
    not compared), and those compared with derived rather than published values."""

    checkpoint: str  # the hub id the stand-in imitates
    chat_template: Pinned | None = None  # a .jinja file, or a .json holding "chat_template"
    tokens: Pinned | None = None  # token strings and ids extracted from the tokenizer files (tokens.json)
    tokenizer_config: Pinned | None = None  # verbatim tokenizer_config.json: add_bos_token, named tokens
    image_processor: Pinned | None = None  # preprocessor_config.json (or derived settings)
    processor: Pinned | None = None  # processor_config.json
    generation: Pinned | None = None  # generation_config.json
    unverified: dict[str, str] = field(default_factory=dict)  # aspect → why it cannot be checked
    # aspects compared with values derived from a source other than the checkpoint's own files → how
    derived: dict[str, str] = field(default_factory=dict)
    has_chat_template: bool = True  # False: the checkpoint has none (PaliGemma, a prefix-LM)
    # (image processor dict, processor dict) as published → as transformers 5 lays them out (keys a family's
    # current classes moved or no longer read); None: as published
    layout: Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None

    def files(self) -> list[Pinned]:
        found = [
            self.chat_template,
            self.tokens,
            self.tokenizer_config,
            self.image_processor,
            self.processor,
            self.generation,
        ]
        return list(dict.fromkeys(p for p in found if p is not None))

    def template(self) -> str | None:
        """The published chat template, byte for byte (None: not published, or the checkpoint has none)."""
        if self.chat_template is None:
            return None
        if self.chat_template.file.endswith(".json"):
            return self.chat_template.json()["chat_template"]
        return self.chat_template.text()

    def special_tokens(self) -> dict[str, Any]:
        """bos/eos/pad/unk strings (None where the tokenizer has none), the named extra tokens, whether the
        tokenizer adds bos by itself (only where a published tokenizer config says), end of turn, image tokens."""
        out: dict[str, Any] = {}
        if self.tokens is not None:
            t = self.tokens.json()
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                if key in t:
                    out[key] = t[key]
            out |= {f"named.{k}": v for k, v in t.get("named", {}).items()}
            out["end_of_turn"] = t["end_of_turn"]
            out["image_tokens"] = sorted(t["image_tokens"])
            if "bos_token" in t and t["bos_token"] is None:
                out["adds_bos"] = False  # nothing to add
        if self.tokenizer_config is not None:
            c = self.tokenizer_config.json()
            # GPT2Tokenizer's and the tokenizers backend's default: no bos added
            out["adds_bos"] = bool(c.get("add_bos_token", False))
            extra = c.get("extra_special_tokens")
            if isinstance(extra, dict):
                out |= {f"named.{k}": v for k, v in extra.items()}
        return out

    def id_to_token(self) -> dict[int, str]:
        """Token strings of the published ids (tokens.json, tokenizer_config.json added tokens)."""
        ids: dict[int, str] = {}
        if self.tokenizer_config is not None:
            added = self.tokenizer_config.json().get("added_tokens_decoder", {})
            ids |= {int(i): t["content"] for i, t in added.items()}
        if self.tokens is not None:
            ids |= {int(i): t for t, i in self.tokens.json().get("ids", {}).items()}
        return ids

    def generation_tokens(self) -> dict[str, Any]:
        """generation_config.json's bos/eos/pad ids as token strings (eos: a list where several stop)."""
        if self.generation is not None:
            gen = self.generation.json()
        elif self.tokens is not None and "generation_eos_token_id" in self.tokens.json():
            gen = {"eos_token_id": self.tokens.json()["generation_eos_token_id"]}
        else:
            return {}
        names = self.id_to_token()
        out = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in gen:
                value = gen[key]
                out[key] = [names[i] for i in value] if isinstance(value, list) else names.get(value)
        return out

    def settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(image processor settings, processor settings) as transformers 5 reads them: the published files'
        keys, moved where the family's current classes keep them (`layout`), file bookkeeping dropped."""
        ip = dict(self.image_processor.json()) if self.image_processor is not None else {}
        proc = dict(self.processor.json()) if self.processor is not None else {}
        ip.pop("_derived", None)
        if "processor_class" in ip:  # bookkeeping: which processor the file belongs to
            proc.setdefault("processor_class", ip.pop("processor_class"))
        if self.layout is not None:
            ip, proc = self.layout(ip, proc)
        return ip, proc

    def image_processor_kwargs(self) -> dict[str, Any]:
        """The published image processor settings as constructor arguments (the type name dropped)."""
        ip, _ = self.settings()
        return {k: v for k, v in ip.items() if k != "image_processor_type"}

    def expected(self) -> dict[str, Any]:
        """Everything a stand-in of this checkpoint is compared on, flat: "chat_template", "tokens.*",
        "generation.*", "processor.*" (the image processor's settings: `differences` reads them through the
        stand-in's own class). Aspects in `unverified` are left out."""
        out: dict[str, Any] = {}
        if "chat_template" not in self.unverified:
            if self.has_chat_template and self.chat_template is None:
                raise ValueError(f"{self.checkpoint}: pin its chat template or list it as unverified")
            out["chat_template"] = self.template()
        if "special_tokens" not in self.unverified:
            out |= {f"tokens.{k}": v for k, v in self.special_tokens().items() if k not in self._skipped()}
            out |= {f"generation.{k}": v for k, v in self.generation_tokens().items()}
        if "processor_settings" not in self.unverified:
            _, proc = self.settings()
            out |= {f"processor.{k}": v for k, v in flatten(proc).items()}
        return out

    def _skipped(self) -> set[str]:
        return {k.removeprefix("special_tokens.") for k in self.unverified if k.startswith("special_tokens.")}

    def verify(self) -> list[str]:
        """Problems with the pinned copy: a file missing or not matching its sha256."""
        problems = []
        for p in self.files():
            try:
                p.read()
            except (OSError, RuntimeError) as err:
                problems.append(f"{p.file}: {err}")
        return problems


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"size": {"height": 2}} → {"size.height": 2}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
