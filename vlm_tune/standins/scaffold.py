"""The scaffold every offline stand-in is built on: the offline tokenizer, the spec marker, the atomic save.

A stand-in directory holds an ordinary model + processor (`save_pretrained`) and a JSON spec marker
(`tiny_spec.json`, or the builder's own file name), written last: a build is reused only while its marker
equals what the builder wants now. The marker and the directory name are all that a cache keys on: neither
names a module. Used by every family's builder (the tiny SmolVLM: `vlm_tune.families.smolvlm.build_tiny_model`,
the others: `vlm_tune.families.*._build`), the real-decoder model and the benchmark shapes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError


def _corpus() -> list[str]:
    colors = [
        "red",
        "green",
        "blue",
        "orange",
        "purple",
        "yellow",
        "brown",
        "pink",
        "gray",
        "black",
        "cyan",
        "white",
    ]
    words = [
        "how",
        "many",
        "bars",
        "points",
        "slices",
        "are",
        "there",
        "in",
        "the",
        "chart",
        "which",
        "what",
        "color",
        "colour",
        "label",
        "has",
        "largest",
        "smallest",
        "highest",
        "lowest",
        "value",
        "of",
        "is",
        "greater",
        "than",
        "less",
        "answer",
        "with",
        "a",
        "single",
        "word",
        "or",
        "number",
        "question",
        "phrase",
        "yes",
        "no",
        "bar",
        "line",
        "pie",
        "tallest",
        "shortest",
        "biggest",
        "the",
        "of",
        "System",
        "User",
        "Assistant",
        "Answer",
        "briefly",
        "using",
    ]
    lines = [" ".join(words), " ".join(colors), " ".join(w.capitalize() for w in words)]
    lines += [f"{n} {n}.{n % 10} {n}% ${n} -{n}" for n in range(0, 101)]
    lines += [f"What color is the {w} bar? {c}" for w in ("tallest", "shortest") for c in colors]
    lines += [f"How many {k} are there? {n}" for k in ("bars", "points", "slices") for n in range(1, 10)]
    lines += [f"Is {a} greater than {b}? Yes No" for a in "ABCDEFGH" for b in "ABCDEFGH"]
    lines += [f"Which label has the {w} value? {a}" for w in ("largest", "smallest") for a in "ABCDEFGHIJ"]
    lines += ["Answer with a single word or number.", "Answer the question using a single word or phrase."]
    lines += [" ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), " ".join("abcdefghijklmnopqrstuvwxyz")]
    return lines


def build_tokenizer(
    vocab_size: int,
    special_tokens: list[str],
    eos: str,
    pad: str,
    unk: str | None = None,
    extra_corpus: tuple[str, ...] = (),
    **tokenizer_kwargs,
):
    """A byte-level BPE trained on chart-QA vocabulary (plus `extra_corpus`, e.g. a family's newline runs), with
    a family's special tokens (ids in list order) and its eos/pad/unk (and bos etc. as `tokenizer_kwargs`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(_corpus() + list(extra_corpus)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[t for t in special_tokens if t != pad],
        padding_side="right",
        **tokenizer_kwargs,
    )


def save_built_model(model: Any, processor: Any, out_dir: Path, spec_file: str, spec: dict[str, Any]) -> Path:
    """Write a locally built model + processor + its spec marker to out_dir: built in a staging directory
    beside it, then published atomically (`vlm_tune.cache.publish`), so a reader never sees a half-written
    build, and a concurrent writer of the same build (another rank or machine) never deletes one in use."""
    from vlm_tune.cache import publish, staging_dir

    staged = staging_dir(out_dir)
    try:
        model.save_pretrained(staged)
        processor.save_pretrained(staged)
        (staged / spec_file).write_text(json.dumps(spec, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return publish(staged, out_dir, lambda path: _holds(path, spec_file, spec))


def _holds(path: Path, spec_file: str, spec: dict[str, Any]) -> bool:
    """path holds a complete build of spec (its marker, written last, equals spec)."""
    try:
        return json.loads((path / spec_file).read_text()) == spec
    except (OSError, ValueError):
        return False


def stand_in_settings(
    label: str, defaults: dict[str, Any], published: dict[str, Any], optional: Iterable[str] = ()
) -> dict[str, Any]:
    """A family stand-in's settings: its tiny defaults overridden by a real checkpoint's `published` ones
    (tuples as lists, as the JSON spec marker holds them); a key it does not know (outside `defaults` and
    `optional`) is a ValueError naming the family."""
    unknown = set(published) - set(defaults) - set(optional)
    if unknown:
        raise ValueError(f"unknown {label} stand-in settings: {sorted(unknown)}")
    return {**defaults, **{k: list(v) if isinstance(v, tuple) else v for k, v in published.items()}}


def save_stand_in(
    model_cls: Any,
    config: Any,
    processor: Any,
    out_dir: Path,
    want: dict[str, Any],
    seed: int,
    *,
    eos: int | list[int],
    pad: int,
    bos: int | None,
) -> Path:
    """Initialise a family stand-in with seeded random weights (the global RNG untouched), set the ids its
    generation uses, and save it with its spec marker (save_built_model)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = eos, pad, bos
    return save_built_model(model, processor, out_dir, "tiny_spec.json", want)


def reuse_or_prepare(out_dir: Path, want: dict[str, Any]) -> bool:
    """True if out_dir already holds a complete build of `want` (its tiny_spec.json); otherwise make ready to
    build there, refusing a directory that is neither empty nor an earlier build. For the family stand-ins."""
    marker = out_dir / "tiny_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return True
    if out_dir.exists() and not (out_dir.is_dir() and replaceable(out_dir)):
        raise UserError(
            f"{out_dir} exists and is not an earlier stand-in build; choose a new or empty directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return False


def replaceable(out_dir: Path) -> bool:
    """An existing out_dir may be replaced only if it is empty or an earlier tiny build."""
    return (out_dir / "tiny_spec.json").is_file() or not any(out_dir.iterdir())
