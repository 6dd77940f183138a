"""Load a data source into canonical rows and check every row before training starts.

Canonical row: `id` (str), `images` (list of RGB PIL images, in order), `question` (str), `answers`
(list of non-empty gold strings; training uses the first), `split`, `type`, and optionally `messages`
(a conversational row). Sources: 'synthetic', a hub dataset id, or a directory/file in one of the layouts of
`vlm_tune.data.formats` (save_to_disk, ChartQA as released, .jsonl/.json tables, LLaVA and ShareGPT rows, .csv,
.parquet; image paths relative to the file). Gold answers are kept byte for byte.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_tune.data.images import (  # noqa: F401  (re-exported: the image API of a data source)
    FRAME_SUFFIXES,
    VIDEO_SUFFIXES,
    decode_sampled_frames,
    expand_images,
    open_image,
    sample_frames,
    to_rgb,
    video_frames,
)
from vlm_tune.errors import BadRow, UserError
from vlm_tune.progress import track

CHARTQA_COLUMNS = {"image": "image", "question": "query", "answer": "label", "split": "human_or_machine"}
HUMAN_OR_MACHINE = {0: "human", 1: "augmented", "0": "human", "1": "augmented", "machine": "augmented"}
DEFAULT_OPTIONAL = {"id": "id", "type": "type", "split": "split"}


# ---------------------------------------------------------------------------------------------------------
# answers and conversational rows


def normalize_answers(value: Any, row_id: str, column: str) -> list[str]:
    """A label cell (string, list of strings, or a number) → gold strings, kept byte for byte, or BadRow.

    An empty or whitespace-only answer is a bad row; any other text is kept exactly (surrounding whitespace
    included: `vlm-tune check` counts such answers). A number (only a typed parquet/arrow column gives one)
    becomes `number_text(v)`; its written form is gone, and `check` warns with the count.
    """
    from vlm_tune.data.formats import number_text

    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or v is None or (isinstance(v, float) and v != v):
            raise BadRow("bad_answer", row_id, column, f"answer is {v!r}; expected a non-empty string")
        if isinstance(v, (int, float)):
            v = number_text(v)
        if not isinstance(v, str):
            raise BadRow("bad_answer", row_id, column, f"answer is a {type(v).__name__}; expected a string")
        if not v.strip():
            raise BadRow("bad_answer", row_id, column, "answer is empty")
        out.append(v)
    if not out:
        raise BadRow("bad_answer", row_id, column, "answer list is empty")
    return out


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


def normalize_messages(value: Any, row_id: str, column: str) -> list[dict[str, Any]]:
    """Validate a conversational row: roles, content lists, a final assistant turn with text.

    Turns are {role, content} (content a list of parts, or a string) or LLaVA's {from: human|gpt, value};
    an `<image>` in a string is an image slot at that place.
    """
    from vlm_tune.data.formats import split_placeholders, turn_role_and_content

    if not isinstance(value, list) or not value:
        raise BadRow("bad_messages", row_id, column, "messages must be a non-empty list of {role, content}")
    out = []
    for m in value:
        role, content = turn_role_and_content(m)
        if role not in ("system", "user", "assistant"):
            raise BadRow(
                "bad_messages",
                row_id,
                column,
                f"bad message {m!r}; role must be system/user/assistant (LLaVA: from human/gpt/system)",
            )
        if isinstance(content, str):
            content = split_placeholders(content)
        elif not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
            raise BadRow("bad_messages", row_id, column, f"bad message {m!r}; content must be text or parts")
        parts = []
        for p in content or []:
            kind = p.get("type")
            parts.append(
                {"type": "image"} if kind == "image" else {"type": "text", "text": p.get("text") or ""}
            )
        out.append({"role": role, "content": parts})
    if out[-1]["role"] != "assistant" or not _text_of(out[-1]).strip():
        raise BadRow("bad_answer", row_id, column, "the last message must be an assistant turn with text")
    return out


# ---------------------------------------------------------------------------------------------------------
# sources


def _resolve_columns(spec: str | dict[str, str], available: list[str], is_messages: bool) -> dict[str, str]:
    if isinstance(spec, str):  # 'chartqa' preset
        cols = dict(CHARTQA_COLUMNS)
        if "human_or_machine" not in available:
            cols.pop("split")
        if "messages" in available and is_messages:
            cols = {"messages": "messages", "images": "images" if "images" in available else "image"}
    else:
        cols = dict(spec)
    for role, name in DEFAULT_OPTIONAL.items():
        if role not in cols and name in available:
            cols[role] = name
    return cols


@dataclass
class RowSet:
    """One split of a source, with its column mapping. `row(i)` returns a canonical row or raises BadRow."""

    dataset: Any
    columns: dict[str, str]
    base_dir: Path | None
    max_frames: int
    name: str

    def __len__(self) -> int:
        return len(self.dataset)

    def row_id(self, i: int, raw: dict[str, Any] | None = None) -> str:
        raw = raw if raw is not None else self.dataset[i]
        col = self.columns.get("id")
        return str(raw[col]) if col and raw.get(col) is not None else f"{self.name}[{i}]"

    def row(self, i: int, images: bool | str = True) -> dict[str, Any]:
        """Row i; images=False leaves images undecoded (no "images" key) for scoring and reports;
        images="sizes": `ImageSize`s read from the image headers in place of images (for measuring tokens)."""
        raw = self.dataset[i]
        rid = self.row_id(i, raw)
        cols = self.columns
        image_col = cols.get("images") or cols.get("image")
        out: dict[str, Any] = {"id": rid}
        if "messages" in cols:
            messages = normalize_messages(raw.get(cols["messages"]), rid, cols["messages"])
            out["messages"] = messages
            n_slots = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
            given = raw.get(image_col) if image_col else None
            decoded = (
                expand_images(given, self.base_dir, self.max_frames, rid, image_col, images == "sizes")
                if images and given not in (None, "", [])
                else []
            )
            if images and len(decoded) != n_slots:
                raise BadRow(
                    "image_count_mismatch",
                    rid,
                    image_col,
                    f"messages have {n_slots} image slot(s) (<image> placeholders or image parts) but the row "
                    f"gives {len(decoded)} image(s)",
                )
            if images:
                out["images"] = decoded
            users = [m for m in messages if m["role"] == "user"]
            out["question"] = _text_of(users[-1]) if users else ""
            out["answers"] = [_text_of(messages[-1])]
        else:
            if images:
                out["images"] = expand_images(
                    raw.get(image_col), self.base_dir, self.max_frames, rid, image_col, images == "sizes"
                )
            question = raw.get(cols["question"])
            if not isinstance(question, str) or not question.strip():
                raise BadRow(
                    "bad_question", rid, cols["question"], f"question is {question!r}; expected text"
                )
            out["question"] = question.strip()
            out["answers"] = normalize_answers(raw.get(cols["answer"]), rid, cols["answer"])
        split_val = raw.get(cols["split"]) if "split" in cols else None
        if cols.get("split") == "human_or_machine":
            split_val = HUMAN_OR_MACHINE.get(split_val, split_val)
        out["split"] = str(split_val) if split_val is not None else self.name
        out["type"] = (
            str(raw[cols["type"]]) if "type" in cols and raw.get(cols["type"]) is not None else "all"
        )
        return out


def _check_columns(ds: Any, cols: dict[str, str], source: str) -> None:
    available = list(ds.column_names)
    missing = [f"{role} → {name!r}" for role, name in cols.items() if name not in available]
    image_col = cols.get("images") or cols.get("image")
    needed = ["messages"] if "messages" in cols else ["question", "answer"]
    problems = [r for r in needed if r not in cols]
    if not image_col:
        problems.append("image")
    if missing or problems:
        what = ", ".join(missing + [f"{p} (no column mapped)" for p in problems])
        raise UserError(
            f"{source}: missing column(s): {what}. Available columns: {available}. "
            "Map them with data.columns, e.g. data.columns='{image: img, question: q, answer: a}'"
        )


def _no_decode(ds: Any) -> Any:
    """Keep Image columns as {'bytes','path'} so decoding (and its errors) happens per row, here."""
    from datasets import Image as HFImage
    from datasets import Sequence as HFSequence

    for name, feature in ds.features.items():
        if isinstance(feature, HFImage):
            ds = ds.cast_column(name, HFImage(decode=False))
        elif isinstance(feature, HFSequence) and isinstance(feature.feature, HFImage):
            ds = ds.cast_column(name, HFSequence(HFImage(decode=False)))
        elif isinstance(feature, list) and feature and isinstance(feature[0], HFImage):
            ds = ds.cast_column(name, [HFImage(decode=False)])
    return ds


def load_split(data_cfg: Any, split: str, cache_dir: str | Path, seed: int = 0) -> RowSet:
    """Open one split of data.source as a RowSet (nothing decoded yet)."""
    import datasets

    source = data_cfg.source
    base_dir: Path | None = None
    layout_cols: dict[str, str] | None = None
    fixed_layout = False  # ChartQA as released: its columns whatever data.columns says
    if source == "synthetic":
        from vlm_tune.data.synthetic import ensure_synthetic

        s = data_cfg.synthetic
        path = ensure_synthetic(
            Path(cache_dir) / f"synthetic-{s.seed}-{s.image_size}-{s.n_train}-{s.n_test}-{s.min_elements}-"
            f"{s.max_elements}-{'_'.join(s.chart_kinds)}-{'_'.join(s.question_types)}",
            n_train=s.n_train,
            n_test=s.n_test,
            seed=s.seed,
            image_size=s.image_size,
            chart_kinds=tuple(s.chart_kinds),
            question_types=tuple(s.question_types),
            min_elements=s.min_elements,
            max_elements=s.max_elements,
        )
        dd = datasets.load_from_disk(str(path))
        ds = _pick_split(dd, split, source)
    elif Path(source).is_dir():
        from vlm_tune.data.formats import directory_layout, load_chartqa

        if directory_layout(Path(source)) == "chartqa":
            ds, layout_cols = load_chartqa(Path(source), split)
            fixed_layout = True
        else:
            dd = datasets.load_from_disk(source)
            ds = _pick_split(dd, split, source) if isinstance(dd, datasets.DatasetDict) else dd
    elif Path(source).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        from vlm_tune.data.formats import load_file

        path = Path(source)
        if not path.is_file():
            raise UserError(f"data.source: file not found: {path}")
        base_dir = path.resolve().parent
        ds, layout_cols = load_file(path, split)
    elif "/" in source and not Path(source).exists() and not source.startswith((".", "/")):
        try:
            ds = datasets.load_dataset(source, data_cfg.config_name, revision=data_cfg.revision, split=split)
        except ValueError as err:
            if "split" in str(err).lower():
                raise UserError(f"data.source {source}: no split {split!r} ({err})") from None
            raise
        except Exception as err:  # offline, not cached, not found
            raise UserError(
                f"data.source {source!r} (split {split!r}) could not be loaded: {type(err).__name__}: {err}\n"
                "If this machine is offline: download it once on a connected machine "
                f"(`python -c \"import datasets; datasets.load_dataset('{source}').save_to_disk('DIR')\"`), "
                "copy DIR here and set data.source=DIR."
            ) from None
    else:
        from vlm_tune.data.formats import LAYOUTS

        raise UserError(
            f"data.source: {source!r} is not 'synthetic', an existing directory or file, or a hub dataset id "
            f"(ORG/NAME). Recognised layouts: {LAYOUTS}"
        )
    ds = _no_decode(ds)
    is_messages = "messages" in ds.column_names
    cols = _resolve_columns(data_cfg.columns, list(ds.column_names), is_messages)
    if layout_cols and (fixed_layout or isinstance(data_cfg.columns, str)):  # a layout's own columns
        cols = dict(layout_cols)
        for role, name in DEFAULT_OPTIONAL.items():
            if role not in cols and name in ds.column_names:
                cols[role] = name
    _check_columns(ds, cols, source)
    return RowSet(ds, cols, base_dir, data_cfg.max_frames, split)


def _pick_split(dd: Any, split: str, source: str) -> Any:
    if split not in dd:
        raise UserError(f"data.source {source}: no split {split!r}; available: {list(dd.keys())}")
    return dd[split]


# ---------------------------------------------------------------------------------------------------------
# the pre-flight pass


@dataclass
class PreparedSplit:
    """Indices of usable rows, what was skipped and why, and each kept row's token counts."""

    rowset: RowSet
    indices: list[int]
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    tokens: list[dict[str, int]] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.rowset.name}: {len(self.indices)} rows, none skipped"
        parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        return f"{self.rowset.name}: {len(self.indices)} rows kept, {sum(self.skipped.values())} skipped ({parts})"


def prepare_split(
    rowset: RowSet,
    on_bad_row: str = "error",
    on_overlong: str = "error",
    max_length: int | None = None,
    processor: Any = None,
    collator: Any = None,
    limit: int | None = None,
    require_rows: bool = True,
    indices: Iterable[int] | None = None,
    progress: bool = False,
) -> PreparedSplit:
    """Decode and check every row once (bad images, answers, token budget) before any training step.

    Rows checked: `indices` (in order), else the first `limit` rows. progress: a bar over the rows.
    A raised error carries `row_index`, the position of its row.
    """
    from vlm_tune.data.collate import count_tokens

    prepared = PreparedSplit(rowset, [])
    n = len(rowset) if limit is None else min(limit, len(rowset))
    todo = list(range(n) if indices is None else indices)
    for i in track(todo, len(todo), f"pre-flight {rowset.name}" if progress else None, "rows"):
        try:
            row = rowset.row(i)
        except BadRow as err:
            if on_bad_row == "error":
                err.row_index = i
                raise
            prepared.skipped[err.reason] += 1
            prepared.skipped_examples.setdefault(err.reason, str(err).split(" (reason")[0])
            continue
        if processor is not None and collator is not None:
            try:
                counts = count_tokens(processor, collator, row)
            except UserError as err:  # an image the processor cannot take: name the row
                located = UserError(f"row {row['id']}: {err}")
                located.row_index = i
                raise located from None
            if max_length is not None and counts["total"] > max_length:
                if on_overlong == "error":
                    err = UserError(
                        f"row {row['id']}: {counts['total']} tokens ({counts['image']} image tokens) is over "
                        f"train.max_length={max_length}. Rows are never truncated through image or answer tokens: "
                        "raise train.max_length, lower model.image.longest_edge, or set data.on_overlong=skip."
                    )
                    err.row_index = i
                    raise err
                prepared.skipped["overlong"] += 1
                prepared.skipped_examples.setdefault("overlong", f"row {row['id']}: {counts['total']} tokens")
                continue
            prepared.tokens.append(counts)
        prepared.indices.append(i)
    if require_rows and not prepared.indices:
        raise UserError(f"{rowset.name}: no usable rows ({prepared.summary()})")
    return prepared


class RowDataset:
    """A torch-style dataset of canonical rows over the kept indices (images decoded per item)."""

    def __init__(self, prepared: PreparedSplit) -> None:
        self.rowset = prepared.rowset
        self.indices = prepared.indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rowset.row(self.indices[i])


class LazyRows(Sequence):
    """Rows of a prepared split, images decoded only when a row is taken (one generation batch at a time).

    `rows[i]` decodes row i's images; `rows[a:b]` (or any slice) is another LazyRows, nothing decoded;
    `rows.texts()` holds the rows without images (id, question, answers, type, split) for scoring.
    """

    def __init__(self, rowset: RowSet, indices: list[int]) -> None:
        self.rowset = rowset
        self.indices = list(indices)
        self._texts: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, prepared: PreparedSplit) -> LazyRows:
        return cls(prepared.rowset, prepared.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return LazyRows(self.rowset, self.indices[i])
        return self.rowset.row(self.indices[i])

    def take(self, positions: Sequence[int]) -> LazyRows:
        """The rows at these positions, as another LazyRows (nothing decoded)."""
        return LazyRows(self.rowset, [self.indices[k] for k in positions])

    def sized(self, k: int) -> dict[str, Any]:
        """Row k with `ImageSize`s read from the image headers in place of its images (nothing decoded)."""
        return self.rowset.row(self.indices[k], images="sizes")

    def texts(self) -> list[dict[str, Any]]:
        """Every row without its images (read once, then kept: a few hundred bytes a row)."""
        if self._texts is None:
            self._texts = [self.rowset.row(i, images=False) for i in self.indices]
        return self._texts

    def image_of(self) -> Any:
        """A callable id → first image of that row (decoded on demand), for the report."""
        pos = {r["id"]: k for k, r in enumerate(self.texts())}

        def first_image(rid: str) -> Any:
            k = pos.get(rid)
            return None if k is None else (self[k]["images"] or [None])[0]

        return first_image
