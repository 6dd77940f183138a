"""Data layouts read from disk, recognised by their shape, with every gold answer kept as written.

Recognised `data.source` values (besides 'synthetic' and hub ids, handled in `vlm_tune.data.sources`):

- a `save_to_disk` directory (holds `dataset_dict.json` or `state.json`);
- ChartQA as released: a directory holding `{train,val,test}/png/` and `{split}_human.json` /
  `{split}_augmented.json` (each a list of {"imgname", "query", "label"}), or its parent holding
  `ChartQA Dataset/`. Split `test` reads both files (row split `human` / `augmented`, scored separately);
  `test_human` or `test_augmented` reads one;
- a .json / .jsonl file: a table of rows (column mapping `data.columns`), or conversational rows, found by
  their keys: LLaVA (`conversations` of {"from": human|gpt|system, "value"}, `image` or `images`) and the
  ShareGPT layout LLaMA-Factory uses (`messages` of {"role", "content": str}, `images`): each `<image>` in
  a turn's text is where the next image of the row goes;
- a .csv file (every cell is text) or a .parquet file (columns as typed in the file).

Answers are text, byte for byte: JSON numbers keep their written text (`007`, `0.50`, `1e-3`), CSV cells are
never converted. Only a source that stores a number as a number (a parquet/arrow float or int column) cannot
give the text back; `answer_warnings` counts those for `vlm-tune check`. Image paths are relative to the
file (or to `{split}/png/` for ChartQA).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
CHARTQA_SPLITS = ("train", "val", "test")
CHARTQA_KINDS = ("human", "augmented")
CHARTQA_RAW_COLUMNS = {"image": "image", "question": "query", "answer": "label", "split": "split", "id": "id"}
LAYOUTS = (
    "a save_to_disk directory (dataset_dict.json or state.json); ChartQA as released (DIR/{train,val,test}/png/ "
    "and {split}_human.json / {split}_augmented.json, or DIR/'ChartQA Dataset'/...); a .jsonl/.json table or "
    "LLaVA (conversations + image/images) or ShareGPT (messages + images) rows; a .csv or .parquet table"
)


class ListDataset:
    """Rows as plain Python values (whatever type each cell has), with the few Dataset methods we use."""

    def __init__(self, rows: list[dict[str, Any]], column_names: list[str] | None = None) -> None:
        self.rows = rows
        if column_names is None:
            column_names = []
            for r in rows:
                column_names.extend(k for k in r if k not in column_names)
        self.column_names = column_names
        self.features: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return [r.get(key) for r in self.rows]
        return {c: self.rows[key].get(c) for c in self.column_names}

    def select_columns(self, columns: list[str]) -> ListDataset:
        return ListDataset(self.rows, [c for c in self.column_names if c in columns])


# ---------------------------------------------------------------------------------------------------------
# reading files: numbers stay text


def _as_written(text: str) -> str:
    return text


def parse_json_text(text: str) -> Any:
    """json.loads, except that every JSON number comes back as the text written in the file."""
    return json.loads(text, parse_float=_as_written, parse_int=_as_written, parse_constant=_as_written)


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """A .jsonl or .json file: a list of objects, or one object a line; numbers kept as written."""
    text = path.read_text(encoding="utf-8-sig")
    as_lines = path.suffix.lower() == ".jsonl"
    if not as_lines:
        try:
            rows = parse_json_text(text)
        except json.JSONDecodeError as err:
            if not err.msg.startswith("Extra data"):  # "Extra data": one object a line, in a .json file
                raise UserError(f"data.source {path}: not valid JSON ({err})") from None
            as_lines = True
    if as_lines:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(parse_json_text(line))
            except json.JSONDecodeError as err:
                raise UserError(f"data.source {path}: line {n} is not JSON ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(
            f"data.source {path}: layout not recognised: expected a list of objects (one per row). "
            f"Recognised layouts: {LAYOUTS}"
        )
    return rows


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """Every cell as the text in the file (no number, date or NA conversion; an empty cell is '')."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        rows = [dict(r) for r in reader]
        columns = list(reader.fieldnames or [])
    return [{c: r.get(c) for c in columns} for r in rows]


def conversational_columns(column_names: list[str]) -> dict[str, str] | None:
    """The column mapping of LLaVA (`conversations`) or ShareGPT (`messages`) rows, or None for a table."""
    messages = next((c for c in ("conversations", "messages") if c in column_names), None)
    if messages is None:
        return None
    images = next((c for c in ("images", "image") if c in column_names), "images")
    return {"messages": messages, "images": images}


def load_file(path: Path, split: str) -> tuple[Any, dict[str, str] | None]:
    """One split of a .jsonl/.json/.csv/.parquet file: (dataset, the layout's column mapping or None)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        column_names = list(ds.column_names)
        split_values = ds["split"] if "split" in column_names else None
    else:
        rows = read_json_rows(path) if suffix in (".json", ".jsonl") else read_csv_rows(path)
        if not rows:
            raise UserError(f"data.source {path}: no rows")
        if conversational_columns(ListDataset(rows).column_names) and any("image" in r for r in rows):
            # LLaVA files mix `image` (one path) and `images` (a list) from row to row: read both as `images`
            rows = [
                {**r, "images": r.get("images") if r.get("images") is not None else r.get("image")}
                for r in rows
            ]
        ds = ListDataset(rows)
        column_names = ds.column_names
        split_values = ds["split"] if "split" in column_names else None
    if split_values is not None:
        present = sorted({str(v) for v in split_values})
        if split not in present:
            raise UserError(f"data.source {path}: no rows with split == {split!r}; values present: {present}")
        keep = [i for i, v in enumerate(split_values) if str(v) == split]
        ds = (
            ds.select(keep) if suffix == ".parquet" else ListDataset([ds.rows[i] for i in keep], column_names)
        )
    return ds, conversational_columns(column_names)


# ---------------------------------------------------------------------------------------------------------
# directories: save_to_disk or ChartQA as released


def chartqa_root(path: Path) -> Path | None:
    """The folder holding {train,val,test}/png of a ChartQA release at or just below path, else None."""
    for root in (path, path / "ChartQA Dataset"):
        for s in CHARTQA_SPLITS:
            if (root / s / "png").is_dir() and any(
                (root / s / f"{s}_{k}.json").is_file() for k in CHARTQA_KINDS
            ):
                return root
    return None


def directory_layout(path: Path) -> str:
    """'save_to_disk' or 'chartqa'; a UserError naming the directory and the recognised layouts otherwise."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "save_to_disk"
    if chartqa_root(path) is not None:
        return "chartqa"
    raise UserError(f"data.source {path}: directory layout not recognised. Recognised layouts: {LAYOUTS}")


def load_chartqa(path: Path, split: str) -> tuple[ListDataset, dict[str, str]]:
    """Split `train`/`val`/`test` (human + augmented) or `test_human`-style (one file) of a ChartQA release."""
    root = chartqa_root(path)
    assert root is not None
    base, _, kind = split.partition("_")
    kinds = [kind] if kind else list(CHARTQA_KINDS)
    files = [(k, root / base / f"{base}_{k}.json") for k in kinds]
    files = [(k, f) for k, f in files if f.is_file()]
    if base not in CHARTQA_SPLITS or kind not in ("", *CHARTQA_KINDS) or not files:
        available = [
            f"{s}{suffix}"
            for s in CHARTQA_SPLITS
            if any((root / s / f"{s}_{k}.json").is_file() for k in CHARTQA_KINDS)
            for suffix in ("", "_human", "_augmented")
            if not suffix or (root / s / f"{s}{suffix}.json").is_file()
        ]
        raise UserError(f"data.source {root} (ChartQA): no split {split!r}; available: {available}")
    rows = []
    for k, f in files:
        entries = parse_json_text(f.read_text(encoding="utf-8-sig"))
        if not isinstance(entries, list):
            raise UserError(f"{f}: expected a list of {{imgname, query, label}} objects")
        for i, e in enumerate(entries):
            e = e if isinstance(e, dict) else {}
            name = e.get("imgname")
            rows.append(
                {
                    "id": f"{base}_{k}/{i}",
                    "image": str(root / base / "png" / name) if isinstance(name, str) and name else None,
                    "query": e.get("query"),
                    "label": e.get("label"),
                    "split": k,
                }
            )
    return ListDataset(rows, list(CHARTQA_RAW_COLUMNS.values())), dict(CHARTQA_RAW_COLUMNS)


# ---------------------------------------------------------------------------------------------------------
# conversational rows: LLaVA / ShareGPT turns → role + content parts

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def split_placeholders(text: str) -> list[dict[str, Any]]:
    """'<image>What is this?' → [image part, text part]: each placeholder becomes an image slot, in place."""
    parts: list[dict[str, Any]] = []
    for n, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if n:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def turn_role_and_content(message: Any) -> tuple[Any, Any]:
    """(role, content) of a turn in any recognised layout: {role, content} or LLaVA's {from, value}."""
    if not isinstance(message, dict):
        return None, None
    if "from" in message and "role" not in message:
        return ROLES.get(message["from"], message["from"]), message.get("value")
    return ROLES.get(message.get("role"), message.get("role")), message.get("content")


# ---------------------------------------------------------------------------------------------------------
# answers: numbers stored as numbers, whitespace


def number_text(value: int | float) -> str:
    """The text of an answer a source stored as a number (the written form is gone: see answer_warnings)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def answer_warnings(rowset: Any, indices: list[int] | None = None) -> list[str]:
    """Warnings for `check`: answers a source stored as numbers, answers with surrounding whitespace."""
    col = rowset.columns.get("answer")
    if not col or "messages" in rowset.columns:
        return []
    values = rowset.dataset.select_columns([col])[col]
    if indices is not None:
        values = [values[i] for i in indices]
    numeric = padded = 0
    dtypes = set()
    for v in values:
        for a in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                numeric += 1
                dtypes.add(type(a).__name__)
            elif isinstance(a, str) and a.strip() and a != a.strip():
                padded += 1
    out = []
    if numeric:
        out.append(
            f"{numeric} answer(s) in column {col!r} are stored as numbers ({', '.join(sorted(dtypes))}) in "
            f"{rowset.name}'s source: their written text is lost (007 → 7, 0.50 → 0.5, 1e-3 → 0.001) and they "
            "are used as Python prints them. Store the column as strings to keep the text."
        )
    if padded:
        out.append(
            f"{padded} answer(s) in column {col!r} start or end with whitespace (a space, a newline); they are "
            "kept as written, so the model is trained to write it too. Clean the source if that is not meant."
        )
    return out
