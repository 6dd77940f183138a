"""Load a data source into canonical rows and check every row before training starts.

Canonical row: `id` (str), `images` (list of RGB PIL images, in order), `question` (str), `answers`
(list of non-empty gold strings; training uses the first), `split`, `type`, and optionally `messages`
(a conversational row). Sources: 'synthetic', a hub dataset id, or a directory/file in one of the layouts of
`vlm_tune.data.formats` (save_to_disk, ChartQA as released, .jsonl/.json tables, LLaVA and ShareGPT rows, .csv,
.parquet; image paths relative to the file). Gold answers are kept byte for byte.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from vlm_tune.errors import UserError

CHARTQA_COLUMNS = {"image": "image", "question": "query", "answer": "label", "split": "human_or_machine"}
HUMAN_OR_MACHINE = {0: "human", 1: "augmented", "0": "human", "1": "augmented", "machine": "augmented"}
DEFAULT_OPTIONAL = {"id": "id", "type": "type", "split": "split"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


class BadRow(UserError):
    """A row that cannot be used; names the row, the column and the reason."""

    def __init__(self, reason: str, row_id: str, column: str | None, detail: str) -> None:
        self.reason, self.row_id, self.column, self.detail = reason, row_id, column, detail
        where = f"row {row_id}" + (f", column {column!r}" if column else "")
        super().__init__(
            f"{where}: {detail} (reason: {reason}). Fix the row, or set data.on_bad_row=skip to skip and count such rows."
        )


# ---------------------------------------------------------------------------------------------------------
# images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: palette/alpha composited on white, 16-bit and float rescaled to 8 bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else arr * 0
        image = Image.fromarray(arr.astype("uint8"), mode="L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(value: Any, base_dir: Path | None, row_id: str, column: str) -> Image.Image:
    """Decode one image value (PIL image, {'bytes','path'} dict, path string) into RGB, or raise BadRow."""
    what = "image"
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (dict, str, os.PathLike)):
            path = value.get("path") if isinstance(value, dict) else value
            if not path:
                raise BadRow("missing_image", row_id, column, "no image given")
            path = Path(path)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise BadRow("missing_image", row_id, column, f"image file not found: {path}")
            what = f"image file {path}"
            image = Image.open(path)
        elif value is None:
            raise BadRow("missing_image", row_id, column, "image is empty (None)")
        else:
            raise BadRow(
                "missing_image", row_id, column, f"cannot read an image from a {type(value).__name__}"
            )
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        image.load()
    except BadRow:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise BadRow(
            "corrupt_image", row_id, column, f"{what} cannot be decoded ({type(err).__name__}: {err})"
        ) from None
    if image.width == 0 or image.height == 0:
        raise BadRow("empty_image", row_id, column, "image has zero size")
    return to_rgb(image)


def sample_frames(paths: list[Any], max_frames: int) -> list[Any]:
    """Keep at most max_frames, evenly spaced, in temporal order."""
    if len(paths) <= max_frames:
        return paths
    step = len(paths) / max_frames
    return [paths[int(i * step)] for i in range(max_frames)]


def video_frames(path: Path, max_frames: int, row_id: str, column: str) -> list[Image.Image]:
    """Frames sampled evenly from a video file (needs PyAV: `pip install 'vlm-tune[video]'`)."""
    try:
        import av  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        raise BadRow(
            "video_decoder_missing",
            row_id,
            column,
            f"{path.name} is a video; install PyAV (`pip install 'vlm-tune[video]'`) or give a folder of frames",
        ) from None
    try:
        frames, _ = decode_sampled_frames(path, max_frames)
    except Exception as err:
        raise BadRow("corrupt_image", row_id, column, f"video cannot be decoded: {err}") from None
    if not frames:
        raise BadRow("empty_image", row_id, column, f"video {path} has no frames")
    return [to_rgb(f) for f in frames]


def decode_sampled_frames(path: Path, max_frames: int) -> tuple[list[Image.Image], int]:
    """(frames, frames decoded): the frames `sample_frames` picks, without decoding the whole video.

    With a known frame count, seek to the keyframe before each wanted frame and decode forward to it
    (at most one group of pictures per sample); with an unknown count, decode in order and keep a
    reservoir of evenly spaced frames. Only kept frames are converted to images.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames or 0
        rate = stream.average_rate or stream.guessed_rate
        if total <= 0 or not rate or stream.time_base is None:
            decoded = list(container.decode(stream))
            return [f.to_image() for f in sample_frames(decoded, max_frames)], len(decoded)
        wanted = sample_frames(list(range(total)), max_frames)
        start = stream.start_time or 0
        ticks = 1 / (rate * stream.time_base)  # pts per frame
        frames: list[Image.Image] = []
        n_decoded = 0
        last = None
        for index in wanted:
            target = start + int(round(index * ticks))
            if last is None or last.pts is None or target < last.pts or target - last.pts > 2 * ticks:
                container.seek(target, stream=stream, backward=True, any_frame=False)
                last = None
            if last is not None and last.pts is not None and last.pts >= target:
                frames.append(last.to_image())
                continue
            for frame in container.decode(stream):
                n_decoded += 1
                last = frame
                if frame.pts is None or frame.pts >= target - ticks / 2:
                    break
            if last is not None:
                frames.append(last.to_image())
        return frames, n_decoded


def expand_images(
    value: Any, base_dir: Path | None, max_frames: int, row_id: str, column: str
) -> list[Image.Image]:
    """An images cell → ordered RGB images. Lists stay in order; a folder is a video as sorted frames."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise BadRow("missing_image", row_id, column, "image list is empty")
        out = []
        for v in value:
            out.extend(expand_images(v, base_dir, max_frames, row_id, column))
        return out
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not frames:
                raise BadRow("missing_image", row_id, column, f"frame folder {path} holds no images")
            return [open_image(p, None, row_id, column) for p in sample_frames(frames, max_frames)]
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            return video_frames(path, max_frames, row_id, column)
    return [open_image(value, base_dir, row_id, column)]


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

    def row(self, i: int, images: bool = True) -> dict[str, Any]:
        """Row i; images=False leaves images undecoded (no "images" key) for scoring and reports."""
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
                expand_images(given, self.base_dir, self.max_frames, rid, image_col)
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
                    raw.get(image_col), self.base_dir, self.max_frames, rid, image_col
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
    for i in _track(todo, f"pre-flight {rowset.name}", progress):
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
            counts = count_tokens(processor, collator, row)
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


def _track(items: list[int], label: str, enabled: bool) -> Iterator[int]:
    """items, with a rich progress bar (rows done, rate, time left) while enabled."""
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=len(items))
        for i in items:
            yield i
            bar.advance(task)


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
